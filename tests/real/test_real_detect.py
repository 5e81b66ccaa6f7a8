"""Real detectors on the shared COCO128 (opt-in: ``pytest -m slow``; skipped without ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeslim.config import DetectOptions, PTQConfig
from edgeslim.data.detection import open_detection
from edgeslim.jobs.quantize import run_quantize
from edgeslim.models import as_detector, build_model
from edgeslim.models.yolo import COCO_NAMES
from edgeslim.tasks import Detect

SHARED = Path(__file__).resolve().parents[3] / "shared"
COCO128 = SHARED / "data" / "coco128.zip"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COCO128.exists(), reason="needs ../shared/data/coco128.zip")]


def _run(model, info, tmp_path, calib_size=32):
    size = info.input_shape[1]
    calib = open_detection(COCO128, "train2017", imgsz=size)
    test = open_detection(COCO128, "val2017", imgsz=size)
    return run_quantize(model, info, Detect(calib, test, DetectOptions(latency_rounds=5)),
                        PTQConfig(calib_size=calib_size), tmp_path)


def test_yolov5n_int8_keeps_its_map(tmp_path):
    s = _run(*build_model("yolov5n", SHARED / "models" / "yolov5n.pt"), tmp_path)
    assert s["fp32"]["map50"] > 0.45  # the authors report 45.7 on all of COCO val2017
    assert s["onnx_fp32"]["map50"] == pytest.approx(s["fp32"]["map50"], abs=1e-3)
    assert s["onnx_int8"]["map50"] > s["fp32"]["map50"] - 0.04
    assert abs(s["onnx_int8"]["map50"] - s["quantized"]["map50"]) < 0.01  # simulation predicts the deployed model
    assert s["onnx_int8_graph"]["integer_convs"] == s["onnx_int8_graph"]["total_convs"] == 60


def test_fastestdet_state_dict_and_onnx_file_agree(tmp_path):
    fd = SHARED / "models" / "fastestdet"
    a = _run(*build_model("fastestdet", fd / "fastestdet_coco_ap05-0.2532.pth"), tmp_path / "sd")
    model, info = build_model(str(fd / "FastestDet.onnx"))
    b = _run(model, as_detector(info, "fastestdet-activated", COCO_NAMES, "BGR"), tmp_path / "onnx")
    assert a["fp32"]["map50"] > 0.25  # the authors report 25.3 on COCO val2017
    assert b["fp32"]["map50"] == pytest.approx(a["fp32"]["map50"], abs=2e-3)  # the same network, two front ends
    assert b["fp32"]["map50_95"] == pytest.approx(a["fp32"]["map50_95"], abs=2e-3)
    for s in (a, b):
        assert s["onnx_int8"]["map50"] > s["fp32"]["map50"] - 0.03


def test_detect_task_scores_files_as_quantize_reports_them(tmp_path):
    """``tasks.Detect.score_onnx`` (what ``mixed --task detect`` verifies its plans with) gives the mAP the
    ``quantize`` summary reports for the same files (``tasks.detect_parts.evaluate_models``), on real detections."""
    from edgeslim.tasks import Detect

    model, info = build_model("fastestdet", SHARED / "models" / "fastestdet" / "fastestdet_coco_ap05-0.2532.pth")
    size = info.input_shape[1]
    calib = open_detection(COCO128, "train2017", imgsz=size)
    test = open_detection(COCO128, "val2017", imgsz=size).subset(48, 0)
    opts = DetectOptions(latency_rounds=3, simulation_images=8)
    s = run_quantize(model, info, Detect(calib, test, opts), PTQConfig(calib_size=32), tmp_path)
    got = Detect(calib, test, opts, info=info).score_onnx(
        {"fp32": tmp_path / "model_fp32.onnx", "int8": tmp_path / "model_int8.onnx"}, "scoring")
    assert s["onnx_int8"]["map50_95"] > 0.1  # real detections, not an empty match
    assert got == {"fp32": s["onnx_fp32"]["map50_95"], "int8": s["onnx_int8"]["map50_95"]}
