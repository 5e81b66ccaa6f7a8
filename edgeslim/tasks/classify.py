"""The ``classify`` task: labelled images, top-1 of the first output (budgets in points of top-1)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .. import analysis, api
from ..algorithms import mixed_precision as mp
from ..algorithms import ptq
from ..config import AnalyzeOptions, MeasureOptions, MixedPlan, PTQConfig, QATConfig
from ..data import ImageDataset, batches, calibration_indices
from ..errors import EdgeslimError
from ..eval import metrics, ort as ort_eval
from ..eval.layer_error import layer_errors
from ..intgraph import IntGraph
from ..models import ModelInfo
from ..report.provenance import preprocessing
from ..train.data import load_train
from .base import Deployed, QATSetup, Split, check_source, fake_quant_outputs

__all__ = ["Classify", "onnx_top1"]


def onnx_top1(paths: dict[str, Path], test: ImageDataset, batch_size: int, desc: str,
              indices: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 of several ONNX models on ``test`` (or its ``indices``) in onnxruntime, decoding each batch once."""
    n = len(test) if indices is None else len(indices)
    sessions = {k: ort_eval.session(p, threads=0, inputs=n) for k, p in paths.items()}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for x, _ in batches(test, batch_size, indices, desc=desc):
        for k, s in sessions.items():
            outs[k].append(ort_eval.predict(s, x, batch_size))
    labels = test.labels if indices is None else test.labels[indices]
    return {k: metrics.top1(np.concatenate(v), labels) for k, v in outs.items()}


class Classify:
    """Labelled images; top-1 of the first output. ``batch_size``: evaluation batches; ``measure``: latency
    (threads, batches, rounds) and the size of the PyTorch simulation subset."""

    name, metric_key, graph_key = "classify", "top1", "onnx_int8"
    calib_batch_size = 128
    tflite_range_inputs = 256
    sweep_inputs, scores_against_fp32 = "holdout", False
    metric_description = {"name": "top-1", "unit": "points", "per_unit": 100.0}

    def __init__(self, calib: ImageDataset, test: ImageDataset, batch_size: int = 256,
                 measure: MeasureOptions = MeasureOptions()) -> None:
        self.calib, self.test, self.batch_size, self.measure = calib, test, batch_size, measure
        self._val_idx: np.ndarray | None = None  # qat: the validation subset (``qat_setup``)

    def check(self, info: ModelInfo) -> None:
        if info.num_classes and len(self.test.classes) > info.num_classes:
            raise EdgeslimError(f"test data has {len(self.test.classes)} classes but the model predicts "
                                f"{info.num_classes}: pass data for this model")

    # ------------------------------------------------------------------ quantize / analyze

    def calibration(self, config: PTQConfig, info: ModelInfo) -> np.ndarray:
        """``calib_size`` images of ``calib``, seeded and class-balanced."""
        idx = calibration_indices(len(self.calib), config.calib_size, config.seed, self.calib.labels)
        return np.concatenate([x for x, _ in batches(self.calib, 256, idx, desc="loading calibration images")])

    def preprocessing(self, info: ModelInfo) -> dict:
        return preprocessing(self.test.preprocess, info.channel_order, getattr(self.test, "name", ""))

    def metadata(self, info: ModelInfo, config: PTQConfig) -> dict[str, str]:
        return {"edgeslim.model": info.name, "edgeslim.preprocessing": json.dumps(self.preprocessing(info))}

    def fp32_file(self, model: nn.Module, info: ModelInfo, path: Path) -> Path:
        return api.export_fp32_onnx(model, info.input_shape, path)

    def evaluate(self, model: nn.Module, info: ModelInfo, d: Deployed, analyze: AnalyzeOptions | None) -> dict:
        """Top-1 of the two files on every test image (onnxruntime) and of the PyTorch FP32 / fake-quant models on a
        seeded class-balanced subset; per-layer error on the calibration images; the engine with ``analyze``; the
        ``.tflite`` in LiteRT when written."""
        logits, sub = self._logits(model, d)
        y = self.test.labels
        fields = {
            "images": {"calibration": int(len(d.calib)), "test": int(len(y))},
            "chance_top1": 1.0 / max(1, len(self.test.classes)),  # top-1 of a constant guess: reports flag it
            "fp32": {"top1": metrics.top1(logits["onnx_fp32"], y),
                     "scored_by": "onnxruntime (model_fp32.onnx), all images",
                     "pytorch_top1_on_subset": metrics.top1(logits["fp32"], y[sub])},
            "quantized": {"top1": metrics.top1(logits["fq"], y[sub]), "images": int(len(sub)),
                          "flips_vs_fp32": metrics.flips(logits["fq"], logits["fp32"])},
            "onnx_fp32": {"top1": metrics.top1(logits["onnx_fp32"], y)},
            "onnx_int8": {"top1": metrics.top1(logits["onnx_int8"], y),
                          "flips_vs_fp32": metrics.flips(logits["onnx_int8"], logits["onnx_fp32"]),
                          "flips_vs_quantized": metrics.flips(logits["onnx_int8"][sub], logits["fq"])},
            "layers": layer_errors(d.q.model, torch.as_tensor(d.calib[: min(len(d.calib), 64)])),
        }
        if analyze is not None:
            fields.update(analysis.analyze(d.q.intgraph, self.test, logits["onnx_int8"], analyze, self.batch_size))
        if d.lite is not None:
            fields.update(self._tflite_fields(d))
        return fields

    def _logits(self, model: nn.Module, d: Deployed) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Logits of the two ONNX files on every test image (onnxruntime, all cores, batched) and of the PyTorch
        FP32 and fake-quant models on a seeded class-balanced subset (returned as indices): the deployed files are
        what is scored; the simulation is checked against them where it is cheap to run."""
        sessions = {"onnx_fp32": ort_eval.session(d.fp32, threads=0), "onnx_int8": ort_eval.session(d.int8, threads=0)}
        n = len(self.test)
        size = n if self.measure.simulation_images is None else min(n, self.measure.simulation_images)
        sub = calibration_indices(n, size, 0, self.test.labels) if size < n else np.arange(n)
        outs: dict[str, list[np.ndarray]] = {k: [] for k in ("fp32", "fq", *sessions)}
        ptq.set_mode(d.q.model, "quant")
        for x, _ in batches(self.test, self.batch_size, desc="evaluating (onnxruntime)"):
            for k, s in sessions.items():
                outs[k].append(ort_eval.predict(s, x, self.batch_size))
        with torch.no_grad():
            for x, _ in batches(self.test, self.batch_size, sub, desc="simulation subset (PyTorch)"):
                t = torch.from_numpy(x)
                outs["fp32"].append(model(t).numpy())
                outs["fq"].append(d.q.model(t).numpy())
        return {k: np.concatenate(v) for k, v in outs.items()}, sub

    def _tflite_fields(self, d: Deployed) -> dict:
        """``model_int8.tflite`` (+ TFLM files); its top-1 in LiteRT when ``ai-edge-litert`` is installed."""
        from ..export.tflm import score_litert, write_files

        fb, tg, meta = d.lite
        fields = write_files(fb, tg, meta, d.stage, d.formats)
        try:
            fields["tflite"].update(score_litert(fb, batches(self.test, self.batch_size,
                                                             desc="scoring model_int8.tflite (LiteRT)")))
        except ImportError:
            fields["tflite"]["top1"] = None  # ai-edge-litert is not installed: the file is written, not scored
        return fields

    def latency(self, d: Deployed, info: ModelInfo) -> dict:
        """Paired FP32 / INT8 latency at each of ``measure.latency_batches``: medians and the paired ratio."""
        m = self.measure
        lat = {f"batch{b}": ort_eval.latency_samples({"fp32": d.fp32, "int8": d.int8}, info.input_shape, b,
                                                      threads=m.threads, rounds=m.latency_rounds,
                                                      seconds=m.latency_seconds)
               for b in m.latency_batches}
        return {"fp32": {k: statistics.median(v["fp32"]) for k, v in lat.items()},
                "int8": {k: statistics.median(v["int8"]) for k, v in lat.items()},
                "int8_over_fp32": {k: ort_eval.paired_ratio(v, "int8", "fp32") for k, v in lat.items()},
                "threads": m.threads, "rounds": {k: len(v["int8"]) for k, v in lat.items()}}

    def write_report(self, summary: dict, info: ModelInfo, path: Path) -> None:
        from ..report.html import write_report

        write_report(summary, path)

    # ------------------------------------------------------------------ sensitivity / mixed

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str = "calib") -> Split:
        """Calibration images plus a class-balanced held-out subset, disjoint from them (from ``--calib-data`` or,
        with ``holdout_from="data"``, from ``--data``, whose other images then give the final numbers)."""
        check_source(holdout_size, holdout_from)
        calib_ds, test_ds = self.calib, self.test
        idx = calibration_indices(len(calib_ds), config.calib_size, config.seed, calib_ds.labels)
        src = calib_ds if holdout_from == "calib" else test_ds
        rest = np.setdiff1d(np.arange(len(calib_ds)), idx) if holdout_from == "calib" else np.arange(len(test_ds))
        if len(rest) < 50 + (50 if holdout_from == "data" else 0):
            what = "--calib-data" if holdout_from == "calib" else "--data"
            raise EdgeslimError(f"{what} has too few images for a held-out subset of at least 50 (and, from --data, 50 "
                                "more to report on): add images or lower --calib-size")
        size = min(holdout_size, len(rest) - 50) if holdout_from == "data" else holdout_size
        hold = rest[calibration_indices(len(rest), size, config.seed + 1, src.labels[rest])]
        eval_idx = np.arange(len(test_ds)) if holdout_from == "calib" else np.setdiff1d(np.arange(len(test_ds)), hold)
        calib = np.concatenate([x for x, _ in batches(calib_ds, 256, idx, desc="loading calibration images")])
        xh = np.concatenate([x for x, _ in batches(src, 256, hold, desc="loading held-out images")])
        return Split(calib, torch.from_numpy(xh), mp.top1_metric(src.labels[hold]), eval_idx, holdout_from)

    @property
    def test_size(self) -> int:
        return len(self.test)

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]:
        return onnx_top1(paths, self.test, self.batch_size, desc, indices)

    def score_fields(self, paths: dict[str, Path], desc: str,
                     indices: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """Top-1 of each file (its only score)."""
        return {k: {"top1": v} for k, v in self.score_onnx(paths, desc, indices).items()}

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]:
        """Top-1 on the test set of the FP32 model and of the fake-quant model under each plan (one decode pass)."""
        xs = (x for x, _ in batches(self.test, self.batch_size, indices, desc="evaluating on the test set"))
        outs = fake_quant_outputs(gm, config, plans, model, xs)
        labels = self.test.labels if indices is None else self.test.labels[indices]
        return {k: metrics.top1(v[0].numpy(), labels) for k, v in outs.items()}

    # ------------------------------------------------------------------ qat (``calib``: the training images)

    qat_file_key = "onnx"

    def qat_loss(self, cfg: QATConfig) -> tuple[Callable | None, str]:
        """The labels' cross-entropy, or with ``cfg.kd`` distillation from the FP32 model (``qat.qat_loss``)."""
        if cfg.kd:
            return None, (f"distillation: {cfg.kd_weight} * T^2 * KL(FP32 || student) at T = {cfg.kd_temperature} "
                          f"+ {1 - cfg.kd_weight} * cross-entropy on the labels")
        return None, "cross-entropy on the labels"

    def qat_setup(self, teacher: nn.Module, info: ModelInfo, cfg: QATConfig, ptq_config: PTQConfig,
                  train_size: int | None, val_size: int | None, main: bool) -> QATSetup:
        """The training images in memory (a seeded class-balanced subset of ``train_size``), a class-balanced
        calibration subset of them, and a class-balanced validation subset of ``val_size`` test images (None:
        all); the FP32 model's top-1 (main process)."""
        if self.calib.classes != self.test.classes:
            raise EdgeslimError(f"--train-data has classes {self.calib.classes[:4]}... but --data has "
                                f"{self.test.classes[:4]}...: pass the training and test splits of the same data set")
        data = load_train(self.calib, info, train_size, cfg.seed, main)
        images = {"train": len(data.y), "test": len(self.test), "calibration": min(ptq_config.calib_size, len(data.y))}
        fields: dict = {"images": images}
        if main:
            fields["fp32"] = {"top1": self._top1(teacher, "evaluating FP32")}
        idx = calibration_indices(len(data.y), ptq_config.calib_size, ptq_config.seed, data.y.numpy())
        self._val_idx = (calibration_indices(len(self.test), val_size, cfg.seed, self.test.labels) if val_size
                         else None)
        images["validation"] = len(self.test) if self._val_idx is None else len(self._val_idx)
        return QATSetup(data, data.x[idx], self.calib_batch_size, fields)

    def qat_score(self, m: nn.Module, desc: str | None, validation: bool = False) -> dict:
        """Top-1 on every test image (``validation``: on the validation subset)."""
        return {"top1": self._top1(m, desc, self._val_idx if validation else None)}

    def _top1(self, m: nn.Module, desc: str | None, indices: np.ndarray | None = None) -> float:
        m.eval()
        outs = []
        with torch.no_grad():
            for x, _ in batches(self.test, self.batch_size, indices, desc=desc):
                outs.append(m(torch.from_numpy(x)).numpy())
        labels = self.test.labels if indices is None else self.test.labels[indices]
        return metrics.top1(np.concatenate(outs), labels)

    def qat_files(self, gm: fx.GraphModule, graph: IntGraph, fp32: Path, int8: Path, info: ModelInfo) -> dict:
        """The INT8 file's top-1 on every test image in onnxruntime; the files' sizes under the names the classify
        summary has used."""
        top1 = onnx_top1({"int8": int8}, self.test, self.batch_size, "evaluating ONNX")["int8"]
        return {"onnx": {"top1": top1},
                "size_bytes": {"fp32_onnx": fp32.stat().st_size, "int8_onnx": int8.stat().st_size}}
