"""The one ``qat`` job (``jobs.qat.run_qat``) with a task as parameter, through its Python API."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from edgeslim.config import PTQConfig, QATConfig
from edgeslim.errors import EdgeslimError
from edgeslim.jobs.qat import run_qat
from edgeslim.models import ModelInfo
from edgeslim.tasks import Fidelity

INFO = ModelInfo("tiny", (3, 16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 5)


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_a_distilling_task_refuses_ewgs_before_any_work(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(EdgeslimError, match="use --method lsq, ste, dsq or daq"):
        run_qat(tiny_model, INFO, Fidelity(_inputs(8, 0), _inputs(4, 1)), QATConfig(method="ewgs"), PTQConfig(),
                out)
    assert not out.exists()


@pytest.mark.slow
def test_fidelity_qat_validates_on_the_subset_and_reports_the_files_sqnr(tiny_model, tmp_path):
    """``val_size`` picks the inputs scored after every epoch; the INT8 file's reported SQNR is numpy's SQNR of the
    two written files' onnxruntime outputs on every test input."""
    test = _inputs(12, 1)
    out = tmp_path / "run"
    s = run_qat(tiny_model, INFO, Fidelity(_inputs(32, 0), test, batch_size=8),
                QATConfig(4, 4, epochs=None, max_steps=4, batch_size=16, augment=False), PTQConfig(4, 4, calib_size=16),
                out, val_size=5)
    assert s["task"] == "fidelity" and s["inputs"] == {"train": 32, "calibration": 16, "test": 12, "shape": [3, 16, 16],
                                                        "validation": 5}
    assert [h["steps"] for h in s["history"]] == [2, 4] and s["training"]["steps"] == 4
    assert {"summary.json", "checkpoint.pt", "qat_model.pt", "encodings.json", "model_int8.onnx",
            "model_fp32.onnx"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "summary.json").read_text())["onnx_int8"] == s["onnx_int8"]

    def outputs(name: str) -> np.ndarray:
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: test})[0].astype(np.float64)

    ref, got = outputs("model_fp32.onnx"), outputs("model_int8.onnx")
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    assert s["onnx_int8"]["headline_sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
