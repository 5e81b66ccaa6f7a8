"""Real-data check on the shared ResNet-20 (opt-in: pytest -m slow; skipped without ../shared)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.data import Preprocess, calibration_indices, open_dataset
from edgeslim.eval import metrics
from edgeslim.eval import ort as ort_eval
from edgeslim.models import build_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED / "models/resnet20_cifar10jpeg.pt").exists(), reason="../shared absent")]


def test_resnet20_w8a8_keeps_accuracy_and_runs_integer(tmp_path):
    model, info = build_model("resnet20", SHARED / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(SHARED / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(SHARED / "data/cifar10-jpeg-test.zip", pre)
    calib = train.batch(calibration_indices(len(train), 512, 0, train.labels))
    x, y = test.batch(np.arange(len(test))), test.labels
    with torch.no_grad():
        fp32 = torch.cat([model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)]).numpy()
    assert abs(metrics.top1(fp32, y) - 0.8824) <= 0.003
    q = api.quantize(model, calib, PTQConfig())
    with torch.no_grad():
        fq = torch.cat([q.model(torch.from_numpy(x[i:i + 1000])) for i in range(0, len(x), 1000)]).numpy()
    assert metrics.top1(fq, y) >= metrics.top1(fp32, y) - 0.002
    path = api.export_onnx(q, tmp_path / "r20.onnx")
    onnx_logits = ort_eval.predict(ort_eval.session(path, threads=0), x)
    assert abs(metrics.top1(onnx_logits, y) - metrics.top1(fq, y)) <= 0.001
    assert ort_eval.integer_convs(path) == (19, 19)


def test_resnet20_w4a8_brecq_recovers_round_to_nearest_loss(tmp_path):
    """W4A8 on real data: BRECQ (200 iterations per unit) closes most of round-to-nearest's gap, and onnxruntime
    runs the learned codes with the simulation's accuracy."""
    model, info = build_model("resnet20", SHARED / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(SHARED / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(SHARED / "data/cifar10-jpeg-test.zip", pre)
    calib = train.batch(calibration_indices(len(train), 256, 0, train.labels))
    idx = calibration_indices(len(test), 2000, 0, test.labels)
    x, y = test.batch(idx), test.labels[idx]

    def top1(m):
        with torch.no_grad():
            return metrics.top1(torch.cat([m(torch.from_numpy(x[i:i + 500])) for i in range(0, len(x), 500)]).numpy(), y)

    fp32 = top1(model)
    rtn = top1(api.quantize(model, calib, PTQConfig(w_bits=4)).model)
    q = api.quantize(model, calib, PTQConfig(w_bits=4, algorithms=("brecq",), iters=200))
    brecq = top1(q.model)
    assert fp32 - brecq < 0.5 * (fp32 - rtn)
    path = api.export_onnx(q, tmp_path / "r20_w4.onnx")
    assert abs(metrics.top1(ort_eval.predict(ort_eval.session(path, threads=0), x), y) - brecq) <= 0.002


def test_resnet20_w4a4_qat_recovers_ptq_loss(tmp_path):
    """100 LSQ + KD steps on 6,400 training images lift W4A4 (8-bit image input) well above round-to-nearest PTQ."""
    from edgeslim.config import QATConfig
    from edgeslim.config import MixedPlan
    from edgeslim.jobs.qat import run_qat
    from edgeslim.tasks import Classify

    model, info = build_model("resnet20", SHARED / "models/resnet20_cifar10jpeg.pt")
    pre = Preprocess(info.input_shape, info.mean, info.std)
    train = open_dataset(SHARED / "data/cifar10-jpeg-train.zip", pre)
    test = open_dataset(SHARED / "data/cifar10-jpeg-test.zip", pre)
    s = run_qat(model, info, Classify(train, test), QATConfig(4, 4, method="lsq", epochs=None, max_steps=100, kd=True),
                PTQConfig(4, 4, calibrator="mse"), tmp_path / "qat", train_size=6400, val_size=1000,
                plan=MixedPlan.from_dict({"layers": {"conv1": {"w": "int4", "a": "int8"}}}))
    assert s["qat"]["top1"] > s["ptq"]["top1"] + 0.03
    assert abs(s["onnx"]["top1"] - s["qat"]["top1"]) <= 0.002
