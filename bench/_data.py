"""The shared CIFAR ResNet-20 and its data, as every ResNet-20 benchmark loads them."""

from __future__ import annotations

from pathlib import Path

from edgeslim.data import Preprocess, open_dataset
from edgeslim.models import build_model


def resnet20_cifar(shared: Path):
    """(model, info, train, test): the fine-tuned ResNet-20 and the CIFAR-10 JPEG train / test sets."""
    model, info = build_model("resnet20", shared / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(shared / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(shared / "data/cifar10-jpeg-test.zip", pre)
    return model, info, train, test
