"""The ``detect`` task: the detectors edgeslim can decode, scored by mAP.

The network's outputs are the raw head tensors; decoding and NMS run on the host in numpy for every model variant
alike (``detect_task``: runners, mAP and confusion-matrix scoring, the files' metadata). The headline metric is
COCO-style mAP@0.5:0.95 (mAP@0.5, precision / recall / F1 and per-class figures next to it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn

from .. import api
from ..analysis import AnalyzeOptions, check_requant, overflow_summary
from ..config import PTQConfig
from ..data.detection import DetectionDataset
from ..detect_task import (DetectOptions, calibration_images, check_detector, decoded_files, detector_metadata,
                           engine_runner, evaluate_models, fit_options, ort_runner, paired_latency, to_model_order,
                           torch_runner)
from ..models import ModelInfo
from .base import Deployed

__all__ = ["Detect", "TFLITE_RANGE_IMAGES"]

# calibration images whose raw head outputs set the int8 range of the .tflite's heads (the engine runs them: about
# 3 s per yolov5n image at 640 on one core)
TFLITE_RANGE_IMAGES = 32


class Detect:
    """YOLO-format labelled images (``DetectionDataset``); mAP of the decoded detections. ``opts``: thresholds,
    batches, latency and the size of the PyTorch simulation subset (``DetectOptions``)."""

    name, metric_key, graph_key = "detect", "map50_95", "onnx_int8_graph"
    tflite_range_inputs = TFLITE_RANGE_IMAGES

    def __init__(self, calib: DetectionDataset, test: DetectionDataset, opts: DetectOptions = DetectOptions()) -> None:
        self.calib, self.test, self.opts = calib, test, opts

    @property
    def calib_batch_size(self) -> int:
        return self.opts.batch_size

    def check(self, info: ModelInfo) -> None:
        check_detector(info, self.test)

    def calibration(self, config: PTQConfig, info: ModelInfo) -> np.ndarray:
        return calibration_images(self.calib, config.calib_size, config.seed, info)

    def preprocessing(self, info: ModelInfo) -> dict:
        return json.loads(detector_metadata(info)["edgeslim.preprocessing"])

    def metadata(self, info: ModelInfo, config: PTQConfig) -> dict[str, str]:
        return detector_metadata(info)

    def fp32_file(self, model: nn.Module, info: ModelInfo, path: Path) -> Path:
        return api.export_fp32_onnx(model, info.input_shape, path)

    def evaluate(self, model: nn.Module, info: ModelInfo, d: Deployed, analyze: AnalyzeOptions | None) -> dict:
        """mAP and confusion figures of the two files on every test image (onnxruntime; per class too), of the
        PyTorch FP32 / fake-quant models on the first ``simulation_images``; the engine with ``analyze``; the
        ``.tflite`` in LiteRT when written; the decoded-output files when asked."""
        from ..export.tflm import litert_runner

        test, decoder, opts = self.test, check_detector(info, self.test), fit_options(model, self.opts)
        runners = {"onnx_fp32": ort_runner(d.fp32), "onnx_int8": ort_runner(d.int8)}
        if d.lite is not None:
            runners["tflite_litert"] = litert_runner(d.lite[0])
        results = evaluate_models(runners, test, decoder, opts, info=info, detail=True)
        if opts.decoded_output:
            results["decoded_output"] = decoded_files(d.fp32, d.int8, test, decoder, opts, info)
        n_sim = len(test) if opts.simulation_images is None else min(len(test), opts.simulation_images)
        sim_set = test if n_sim == len(test) else test.subset(n_sim, 0)
        sim = evaluate_models({"fp32": torch_runner(model), "quantized": torch_runner(d.q.model),
                               "onnx_int8_on_subset": ort_runner(d.int8)}, sim_set, decoder, opts,
                              desc="simulation subset (PyTorch)", info=info)
        for key in ("fp32", "quantized"):
            sim[key]["images"] = n_sim
        results.update(fp32=sim["fp32"], quantized=sim["quantized"])
        if n_sim < len(test):
            results["onnx_int8_on_simulation_subset"] = sim["onnx_int8_on_subset"]
        scored_lite = results.pop("tflite_litert", None)
        fields = {"images": {"calibration": int(len(d.calib)), "test": len(test), "test_boxes": test.num_boxes(),
                             "imgsz": test.imgsz},
                  **results, "detect_options": asdict(opts)}
        if analyze is not None:  # the integer engine: its detections, and overflow statistics
            check_requant(d.q.intgraph, analyze.requant)
            fields["engine_options"] = asdict(analyze)
            if analyze.engine:
                fields.update(evaluate_models({"engine": engine_runner(d.q.intgraph, analyze)}, test, decoder, opts,
                                              desc="integer engine", info=info))
            if analyze.overflow:
                sub = test.subset(min(analyze.overflow_images, len(test)), 0)
                fields["overflow"] = overflow_summary(
                    d.q.intgraph, (to_model_order(x, info) for x, _, _ in sub.batches(opts.batch_size,
                                                                                     desc="overflow statistics")),
                    analyze)
        if d.lite is not None:
            fields.update(self._tflite_fields(d, scored_lite))
        return fields

    def _tflite_fields(self, d: Deployed, scored: dict) -> dict:
        """The ``tflite`` (and ``mcu``) summary fields: the files, the mAP of the ``.tflite`` in LiteRT, and the
        engine's ``tflite`` mode against LiteRT / TFLM on two calibration images."""
        from ..export.tflm import agreement, write_files

        fb, tg, meta = d.lite
        fields = write_files(fb, tg, meta, d.stage, d.formats)
        fields["tflite"].update(scored, scored_by="LiteRT (XNNPACK, 1 thread), batch 1, the numpy decoder",
                                engine_vs_runtimes=agreement(tg, fb, d.calib[:2]))
        return fields

    def latency(self, d: Deployed, info: ModelInfo) -> dict:
        return paired_latency(d.fp32, d.int8, info, self.opts)

    def write_report(self, summary: dict, info: ModelInfo, path: Path) -> None:
        from ..report.detect_html import write_detect_report

        write_detect_report(summary, list(info.class_names), path)
