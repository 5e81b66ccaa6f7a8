"""Labelled image data for calibration and evaluation (numpy + PIL only, no torch).

``open_dataset`` reads an ImageFolder directory or zip, CIFAR python batches (folder or
.tar.gz), an .npz, or ``'sklearn-digits'`` and returns an :class:`ImageDataset` of
preprocessed ``C,H,W`` float32 images; ``batches`` iterates it and ``calibration_indices``
picks a seeded, class-balanced calibration subset.
"""

from edgeslim.data.datasets import DEFAULT_CACHE_BYTES, DIGITS, ImageDataset, open_dataset
from edgeslim.data.files import IMAGE_EXTENSIONS
from edgeslim.data.sampling import batches, calibration_indices, check_finite
from edgeslim.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    resize_crop,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_CACHE_BYTES",
    "DIGITS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "Preprocess",
    "batches",
    "calibration_indices",
    "check_finite",
    "open_dataset",
    "resize_crop",
]
