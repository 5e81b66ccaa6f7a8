"""Tiny seeded models and data shared by the fast tests."""

from __future__ import annotations

import os

# The suite's models are tiny: a second torch thread only adds synchronisation (measured on this 2-core machine:
# the same wall time for tests/algorithms, 30% less CPU with one thread), and the second core is left to
# onnxruntime and to the node-test generation beside the run (below). Set before torch is imported; the tests'
# own commands inherit it. A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from edgeslim.models.yolo import COCO_NAMES
from helpers import TINY, USER_MODEL, detect_args


class TinyResNet(nn.Module):
    """Conv-BN-ReLU, a residual block with an option-A shortcut, max pool, GAP, linear: every op kind."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.b3(self.c3(x)) + shortcut)
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyResNet().eval()
    for bn in (m.b1, m.b2, m.b3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m


@pytest.fixture
def tiny_model() -> nn.Module:
    return make_tiny_resnet()


@pytest.fixture
def tiny_calib() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))


# -- data sets and user-model files of the CLI and job tests --------------------------------------------------

@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def user_model(tmp_path):
    path = tmp_path / "usermodels.py"
    path.write_text(USER_MODEL)
    return path


@pytest.fixture(scope="session")
def yolo_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolo")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(6):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            img[y0:y0 + h // 3, x0:x0 + w // 3] = 230
            Image.fromarray(img).save(root / "images" / split / f"{i:03d}.jpg")
            (root / "labels" / split / f"{i:03d}.txt").write_text(
                f"{i % 3} {(x0 + w / 6) / w:.4f} {(y0 + h / 6) / h:.4f} {1 / 3:.4f} {1 / 3:.4f}\n")
    (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(COCO_NAMES)))
    return root


@pytest.fixture(scope="session")
def yolo_quantized(tmp_path_factory, yolo_set) -> tuple[Path, str]:
    """One ``quantize yolov3-tiny --task detect --decoded-output --formats tflite`` run on ``yolo_set`` (random
    weights) shared by the tests that read what it wrote: (its out folder, what it printed). Read-only: a test that
    changes the folder (``edgeslim export``) works on a copy."""
    import contextlib
    import io

    from edgeslim.cli import main

    out = tmp_path_factory.mktemp("yolo_run") / "r"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(detect_args("quantize", "yolov3-tiny", yolo_set, out, "--decoded-output", "--formats", "tflite"))
    assert code == 0, printed.getvalue()
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def three_colours(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("colours")
    for cls in ("a", "b", "c"):
        (root / cls).mkdir()
        for i in range(8):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[:, :, "abc".index(cls)] = 250
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def tiny_job(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "usermodels.py").write_text(TINY)
    return ["quantize", f"{tmp_path / 'usermodels.py'}:tiny", "--input-shape", "3,8,8", "--calib-data",
            str(tmp_path / "images"), "--data", str(tmp_path / "images"), "--calib-size", "8",
            "--out", str(tmp_path / "run")]


# -- the ONNX node tests, generated beside the run -----------------------------------------------------------

def pytest_collection_finish(session):
    """When the run includes the ONNX conformance tests, onnx's reference implementation generates their cases in
    another process while the other tests run (tests/onnx_conformance.py)."""
    if any(item.nodeid.startswith("tests/io/test_onnx_conformance.py") for item in session.items):
        from tests import onnx_conformance  # the module the conformance tests import

        onnx_conformance.generate_in_background()


def pytest_sessionfinish(session, exitstatus):
    import sys

    conformance = sys.modules.get("tests.onnx_conformance")
    if conformance is not None:
        conformance.stop_background()


@pytest.fixture(params=["numpy", "jit"])
def narrow_stages(request, monkeypatch):
    """Stages 2 and 3 of the engine's narrow accumulator (``engine.narrow.narrow_acc``) in numpy, or compiled
    (``engine.narrow_jit``; skipped where numba is missing). A module takes it for every test with
    ``pytestmark = pytest.mark.usefixtures("narrow_stages")``."""
    from edgeslim.engine import narrow, narrow_jit

    if request.param == "jit" and narrow_jit.kernel() is None:
        pytest.skip("numba is not installed: the compiled stages are not used")
    monkeypatch.setattr(narrow, "NARROW_JIT", request.param == "jit")
    return request.param
