"""The detect task reads the INT8 file's scores on the simulation subset from its run on every test image instead of
running the file again; they equal a run of the file on that subset alone (onnxruntime, the same decoder / NMS)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeslim.cli import main
from edgeslim.config import DetectOptions
from edgeslim.data.detection import open_detection
from edgeslim.models import build_model
from edgeslim.tasks.detect_parts import evaluate_models, model_detections, ort_runner, scores

from helpers import SIZE, detect_args


def _heads(x: np.ndarray) -> list[np.ndarray]:
    """A per-image stand-in for a detector: yolov3-tiny-shaped head maps that depend on each image alone."""
    w = np.random.default_rng(0).normal(0, 1, (2, 3, 255)).astype(np.float32)
    pooled = [x.reshape(len(x), 3, s, SIZE // s, s, SIZE // s).mean(axis=(3, 5)) for s in (4, 2)]
    return [np.einsum("ncij,cq->nqij", p, w[k] * 40, dtype=np.float32) - 3 for k, p in enumerate(pooled)]


def test_subset_detections_indexed_from_the_full_run(yolo_set):
    _, info = build_model("yolov3-tiny", input_shape=(3, SIZE, SIZE))
    test = open_detection(yolo_set, "val", imgsz=SIZE)
    opts = DetectOptions(batch_size=4)
    dets, targets = model_detections({"m": _heads}, test, info.decoder, opts, info=info)
    for n in (1, 3, 5):
        idx = test.subset_indices(n, 0)
        sub = test.subset(n, 0)
        assert sub.images == [test.images[i] for i in idx]
        got = scores([dets["m"][i] for i in idx], [targets[i] for i in idx], max(test.num_classes, 1), opts)
        want = evaluate_models({"m": _heads}, sub, info.decoder, opts, info=info)["m"]
        assert got == want
    assert sum(len(d) for d in dets["m"]) > 0
    assert np.array_equal(test.subset_indices(99, 0), np.arange(len(test)))


@pytest.mark.slow
def test_int8_scores_on_the_simulation_subset_equal_a_run_on_it(tmp_path, yolo_set):
    out = tmp_path / "r"
    assert main(detect_args("quantize", "yolov3-tiny", yolo_set, out, "--simulate-size", "3")) == 0
    s = json.loads((out / "summary.json").read_text())
    _, info = build_model("yolov3-tiny", input_shape=(3, SIZE, SIZE))
    test = open_detection(yolo_set, "val", imgsz=SIZE)
    opts = DetectOptions(**s["detect_options"])
    sub = test.subset(3, 0)
    assert sub.images == [test.images[i] for i in test.subset_indices(3, 0)] and len(sub) == 3 < len(test)
    want = evaluate_models({"int8": ort_runner(out / "model_int8.onnx")}, sub, info.decoder, opts, info=info)["int8"]
    assert s["onnx_int8_on_simulation_subset"] == json.loads(json.dumps(want))
    assert s["fp32"]["images"] == s["quantized"]["images"] == 3
    # the full run's detections, indexed: what the task does
    dets, targets = model_detections({"int8": ort_runner(out / "model_int8.onnx")}, test, info.decoder, opts, info=info)
    idx = test.subset_indices(3, 0)
    again = scores([dets["int8"][i] for i in idx], [targets[i] for i in idx], max(test.num_classes, 1), opts)
    assert again == want
