"""The ``detect`` task: the detectors edgeslim can decode, scored by mAP.

The network's outputs are the raw head tensors; decoding and NMS run on the host in numpy for every model variant
alike (``tasks.detect_parts``: runners, mAP and confusion-matrix scoring, the files' metadata). The headline metric is
COCO-style mAP@0.5:0.95 (mAP@0.5, precision / recall / F1 and per-class figures next to it); ``mixed`` budgets are
in its points (``map_metric``: 1.0 = one point), scored on held-out images disjoint from the calibration images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .. import api
from ..algorithms import mixed_precision as mp
from ..algorithms import ptq
from ..analysis import check_requant, overflow_summary
from ..config import AnalyzeOptions, DetectOptions, MixedPlan, PTQConfig, QATConfig
from ..data.detection import DetectionDataset, Target
from .detect_parts import (Decoder, calibration_images, check_detector, decoded_files, detect,
                           detector_metadata, engine_runner, evaluate_models, fit_options, model_detections, ort_runner,
                           paired_latency, scores, to_model_order, torch_runner)
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..intgraph import IntGraph
from ..models import ModelInfo
from ..train.data import TrainData
from ..train.losses import head_distillation
from .base import Deployed, QATSetup, Split, check_source

__all__ = ["Detect", "TFLITE_RANGE_IMAGES", "LETTERBOX_PAD", "SCORE_FIELDS", "export_check", "map_metric"]

# calibration images whose raw head outputs set the int8 range of the .tflite's heads (the engine runs them: about
# 3 s per yolov5n image at 640 on one core)
TFLITE_RANGE_IMAGES = 32
SCORE_FIELDS = ("map50", "map50_95", "precision", "recall", "f1")  # what a scored file reports (score_fields)
LETTERBOX_PAD = 114 / 255  # the grey of the letterbox borders, in [0, 1] pixels: QAT's crops pad with it


class Detect:
    """YOLO-format labelled images (``DetectionDataset``); mAP of the decoded detections. ``opts``: thresholds,
    batches, latency and the size of the PyTorch simulation subset (``DetectOptions``)."""

    name, metric_key, graph_key = "detect", "map50_95", "onnx_int8_graph"
    tflite_range_inputs = TFLITE_RANGE_IMAGES
    # sensitivity sweeps on every test image: mAP of a few dozen held-out images is too noisy to rank layers by,
    # and detection sets rarely hold images beyond the calibration ones; no search tunes on these tables
    sweep_inputs, scores_against_fp32 = "test", False
    metric_description = {"name": "mAP@0.5:0.95", "unit": "points", "per_unit": 100.0}

    def __init__(self, calib: DetectionDataset, test: DetectionDataset, opts: DetectOptions = DetectOptions(), *,
                 info: ModelInfo | None = None) -> None:
        """``info``: the model's (decoder, channel order); needed by ``split`` / ``score_*`` (``mixed``)."""
        self.calib, self.test, self.opts, self.info = calib, test, opts, info
        self._qat: tuple | None = None  # qat: (info, decoder, options fitted to the model), set by ``qat_setup``
        self._val = test  # qat: the images scored after every epoch

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
        PyTorch FP32 / fake-quant models on a seeded subset of ``simulation_images`` (and of the INT8 file there,
        read off its run on every image: onnxruntime's per-image outputs do not depend on the batch); the engine
        with ``analyze``; the ``.tflite`` in LiteRT when written; the decoded-output files when asked."""
        from ..export.tflm import litert_runner

        test, decoder, opts = self.test, check_detector(info, self.test), fit_options(model, self.opts)
        runners = {"onnx_fp32": ort_runner(d.fp32), "onnx_int8": ort_runner(d.int8)}
        if d.lite is not None:
            runners["tflite_litert"] = litert_runner(d.lite[0])
        dets, targets = model_detections(runners, test, decoder, opts, info=info)
        nc = max(test.num_classes, 1)
        results = {k: scores(v, targets, nc, opts, detail=True) for k, v in dets.items()}
        if opts.decoded_output:
            results["decoded_output"] = decoded_files(d.fp32, d.int8, test, decoder, opts, info)
        n_sim = len(test) if opts.simulation_images is None else min(len(test), opts.simulation_images)
        sim_set = test if n_sim == len(test) else test.subset(n_sim, 0)
        sim = evaluate_models({"fp32": torch_runner(model), "quantized": torch_runner(d.q.model)}, sim_set, decoder,
                              opts, desc="simulation subset (PyTorch)", info=info)
        for key in ("fp32", "quantized"):
            sim[key]["images"] = n_sim
        results.update(fp32=sim["fp32"], quantized=sim["quantized"])
        if n_sim < len(test):  # the INT8 file's detections of those images, from the run on every image
            idx = test.subset_indices(n_sim, 0)
            results["onnx_int8_on_simulation_subset"] = scores([dets["onnx_int8"][i] for i in idx],
                                                               [targets[i] for i in idx], nc, opts)
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

    # ------------------------------------------------------------------ sensitivity / mixed

    def _model_info(self) -> ModelInfo:
        if self.info is None:
            raise ValueError("Detect(..., info=model_info) is needed to score plans")
        return self.info

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str = "calib") -> Split:
        """Seeded: ``calib_size`` calibration images (those ``quantize`` uses), and held-out images disjoint from them
        (the rest of ``--calib-data``, or of ``--data`` with ``holdout_from="data"``, whose other images then give
        the final numbers); the metric is mAP@0.5:0.95 of the held-out images."""
        check_source(holdout_size, holdout_from)
        info = self._model_info()
        decoder = check_detector(info, self.test)
        n_cal = len(self.calib)
        cal = (np.arange(n_cal) if config.calib_size >= n_cal else
               np.sort(np.random.default_rng(config.seed).choice(n_cal, config.calib_size, replace=False)))
        src = self.calib if holdout_from == "calib" else self.test
        rest = np.setdiff1d(np.arange(n_cal), cal) if holdout_from == "calib" else np.arange(len(self.test))
        spare = 1 if holdout_from == "data" else 0  # --data keeps at least one image to report on
        if len(rest) < 1 + spare:
            what = ("--calib-data holds no images beyond the --calib-size used for calibration"
                    if holdout_from == "calib" else "--data has too few images")
            raise EdgeslimError(f"{what} for a held-out subset: add images, lower --calib-size, or use "
                                "--holdout-from data")
        size = min(holdout_size, len(rest) - spare)
        hold = np.sort(np.random.default_rng(config.seed + 1).choice(rest, size, replace=False))
        eval_idx = (np.arange(len(self.test)) if holdout_from == "calib"
                    else np.setdiff1d(np.arange(len(self.test)), hold))
        x_cal = np.concatenate([x for x, _ in _batches(self.calib, cal, self.opts.batch_size, info)])
        held = list(_batches(src, hold, self.opts.batch_size, info))
        targets = [t for _, tg in held for t in tg]
        metric = map_metric(targets, decoder, self.opts, max(self.test.num_classes, 1))
        return Split(x_cal, torch.from_numpy(np.concatenate([x for x, _ in held])), metric, eval_idx, holdout_from)

    @property
    def test_size(self) -> int:
        return len(self.test)

    def _score(self, runs: dict, indices: np.ndarray | None, desc: str | None = None) -> dict[str, dict[str, float]]:
        """The score fields (``SCORE_FIELDS``) of each ``runs[k](x) -> raw head outputs`` on the test images
        ``indices`` (None: all)."""
        info = self._model_info()
        decoder = check_detector(info, self.test)
        idx = np.arange(len(self.test)) if indices is None else np.asarray(indices)
        dets: dict[str, list[np.ndarray]] = {k: [] for k in runs}
        targets: list[Target] = []
        for x, tg in _batches(self.test, idx, self.opts.batch_size, info):
            targets += tg
            for k, run in runs.items():
                dets[k] += detect(run(x), decoder, self.opts)
        n = max(self.test.num_classes, 1)
        return {k: _fields(scores(v, targets, n, self.opts)) for k, v in dets.items()}

    def score_fields(self, paths: dict[str, Path], desc: str,
                     indices: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """mAP@0.5, mAP@0.5:0.95 and the confusion-matrix precision / recall / F1 of each ONNX file on the test
        images, in onnxruntime."""
        runs, count = {}, self.test_size if indices is None else len(indices)
        for k, p in paths.items():
            sess = ort_eval.session(p, threads=0, inputs=count)
            name = sess.get_inputs()[0].name
            runs[k] = (lambda s, n: lambda x: _run_fixed(s, n, x))(sess, name)
        return self._score(runs, indices, desc)

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]:
        """mAP@0.5:0.95 of each ONNX file on the test images, in onnxruntime."""
        return {k: v[self.metric_key] for k, v in self.score_fields(paths, desc, indices).items()}

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]:
        """mAP@0.5:0.95 of the FP32 model and of the fake-quant model under each plan, in PyTorch."""
        step = 1 if mp.fixed_batch(model) else self.opts.batch_size  # batch-1 reshapes: one image at a time

        def under(plan: MixedPlan | None):
            def run(x: np.ndarray) -> list[np.ndarray]:
                ptq.apply_plan(gm, config, plan)
                ptq.set_mode(gm, "quant")
                with torch.no_grad():
                    return [t.numpy() for t in mp.outputs_of(gm, torch.from_numpy(x), step)]
            return run

        fp32 = torch_runner(model)
        runs = {"fp32": lambda x: [np.concatenate(o) for o in zip(*(fp32(x[i:i + step])
                                                                    for i in range(0, len(x), step)))],
                **{k: under(p) for k, p in plans.items()}}
        return {k: v[self.metric_key] for k, v in self._score(runs, indices).items()}


    # ------------------------------------------------------------------ qat (``calib``: the training images)

    qat_file_key = "onnx_int8"

    def qat_loss(self, cfg: QATConfig) -> tuple[Callable | None, str]:
        """Head distillation (``train.losses.head_distillation``): no labels, no anchor matching, any decoder."""
        return head_distillation, "head distillation: MSE of sigmoid(raw head outputs) to the FP32 model's (no labels)"

    def qat_setup(self, teacher: nn.Module, info: ModelInfo, cfg: QATConfig, ptq_config: PTQConfig,
                  train_size: int | None, val_size: int | None, main: bool) -> QATSetup:
        """``train_size`` seeded training images (all by default), letterboxed, crops padded with the letterbox
        grey; the first ``calib_size`` of them calibrate; ``val_size`` seeded test images (None: all) are scored
        after every epoch; the FP32 model's mAP."""
        self._qat = (info, check_detector(info, self.test), fit_options(teacher, self.opts))
        self._val = self.test.subset(val_size, cfg.seed) if val_size else self.test
        x = calibration_images(self.calib, train_size or len(self.calib), cfg.seed, info)
        pad = (LETTERBOX_PAD - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
        data = TrainData(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64),
                         torch.from_numpy(np.broadcast_to(pad, (info.input_shape[0],)).copy()))
        images = {"train": len(x), "calibration": min(ptq_config.calib_size, len(x)), "test": len(self.test),
                  "test_boxes": self.test.num_boxes(), "imgsz": self.test.imgsz, "validation": len(self._val)}
        fields = {"images": images, **({"fp32": self.qat_score(teacher, "evaluating FP32")} if main else {})}
        return QATSetup(data, x[:ptq_config.calib_size], self._qat[2].batch_size, fields)

    def qat_score(self, m: nn.Module, desc: str | None, validation: bool = False) -> dict:
        """mAP (and P / R / F1, confusion) of ``m`` in PyTorch on the test images (``validation``: the subset)."""
        info, decoder, opts = self._qat
        m.eval()
        return evaluate_models({"m": torch_runner(m)}, self._val if validation else self.test, decoder, opts,
                               desc=desc or "", info=info)["m"]

    def qat_files(self, gm: fx.GraphModule, graph: IntGraph, fp32: Path, int8: Path, info: ModelInfo) -> dict:
        """The INT8 file's mAP in onnxruntime, how far it is from the trained model on one batch (``export_check``)
        and the paired FP32 / INT8 latency."""
        _, decoder, opts = self._qat
        fields = evaluate_models({"onnx_int8": ort_runner(int8)}, self.test, decoder, opts, desc="evaluating ONNX",
                                 info=info)
        fields["export_check"] = export_check(gm, graph, int8, next(self.test.batches(opts.batch_size))[0], info)
        fields["latency_ms"] = paired_latency(fp32, int8, info, opts)
        return fields


def export_check(gm: nn.Module, graph: IntGraph, path: Path, x: np.ndarray, info: ModelInfo) -> dict:
    """How far onnxruntime's INT8 file is from the trained PyTorch model on one batch: the largest difference of
    each head output, in steps (LSB) of that output's quantizer."""
    x = to_model_order(x, info)
    ours, theirs = torch_runner(gm)(x), ort_runner(path)(x)
    producer = {o: n for n in graph.nodes for o in n.outputs}
    diffs, steps = [], []
    for name, a, b in zip(graph.output_names, ours, theirs):
        node = producer.get(name)
        qp = graph.qparams.get(node.inputs[0]) if node is not None and node.op == "DequantizeLinear" else None
        d = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        diffs.append(d)
        steps.append(d / qp.scale if qp is not None else None)  # None: a float output (no quantizer)
    return {"images": int(len(x)), "max_abs_diff": diffs, "max_diff_lsb": steps}

def _fields(s: dict) -> dict[str, float]:
    return {f: s[f] for f in SCORE_FIELDS}


def _run_fixed(sess, name: str, x: np.ndarray) -> list[np.ndarray]:
    """One onnxruntime session on a batch (image by image for a file whose batch dimension is fixed at 1)."""
    shape = sess.get_inputs()[0].shape
    if shape and shape[0] == 1 and len(x) > 1:
        outs = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    return sess.run(None, {name: x})


def _batches(ds: DetectionDataset, idx: np.ndarray, batch_size: int, info: ModelInfo):
    """``(x in the model's channel order, targets)`` of the images ``idx`` of ``ds``, ``batch_size`` at a time."""
    for a in range(0, len(idx), batch_size):
        items = [ds[int(i)] for i in idx[a:a + batch_size]]
        yield to_model_order(np.stack([it[0] for it in items]), info), [it[1] for it in items]


def map_metric(targets: list[Target], decoder: Decoder, opts: DetectOptions, num_classes: int,
               batch_size: int = 16) -> mp.Metric:
    """mAP@0.5:0.95 of the raw head outputs of images with these ``targets`` (decoded and NMS'd ``batch_size``
    images at a time); budgets in points (1.0 = one point of mAP)."""
    def value(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        n = len(outputs[0])
        dets: list[np.ndarray] = []
        for a in range(0, n, batch_size):
            dets += detect([o[a:a + batch_size].numpy() for o in outputs], decoder, opts)
        return scores(dets, targets, num_classes, opts)["map50_95"]

    return mp.Metric("mAP@0.5:0.95", "points", 100.0, value)
