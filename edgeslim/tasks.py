"""Tasks: how a job gets its data and scores a model, so that one job serves every kind of model.

A task answers three questions for the ``sensitivity`` and ``mixed`` jobs:

* ``split``: which inputs calibrate, which held-out inputs score the sweeps and the search (and with which
  ``Metric``), and which test inputs give the final numbers;
* ``score_onnx``: the metric of exported ONNX files on the test inputs, in onnxruntime;
* ``score_torch``: the metric of the PyTorch fake-quant model under several plans on the test inputs.

``Classify`` is top-1 on labelled images (budgets in points). ``Fidelity`` is label-free: any model, any
number of outputs, scored by the worst output's SQNR against the FP32 model (budgets as a floor in dB).
Detection keeps its own jobs for now (``jobs_detect``: mAP in onnxruntime for every plan).

Adding a task: a class with these three methods and a ``name`` / ``metric_key``, plus its branch in the CLI's
``--task`` (see docs/design.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import fx, nn

from .algorithms import mixed_precision as mp
from .algorithms import ptq
from .config import MixedPlan, PTQConfig
from .data import ImageDataset, batches, calibration_indices
from .errors import EdgeslimError
from .eval import metrics, ort as ort_eval

__all__ = ["Split", "Task", "Classify", "Fidelity", "HOLDOUT_SOURCES", "finite", "onnx_top1"]

HOLDOUT_SOURCES = ("calib", "data")


@dataclass(frozen=True)
class Split:
    """The data roles of a run (see ``jobs_mixed``'s docstring)."""

    calib: np.ndarray  # model inputs that calibrate
    holdout: torch.Tensor  # inputs that score every plan
    metric: mp.Metric  # how the held-out outputs are scored
    eval_idx: np.ndarray  # the test inputs the final numbers use
    holdout_from: str = "calib"


class Task(Protocol):
    name: str
    metric_key: str  # what the summary calls the score: "top1", "sqnr_db"

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str) -> Split: ...

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]: ...

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]: ...


def finite(v: float | None) -> float | None:
    """JSON-safe: None for an infinite score (SQNR of identical outputs)."""
    return v if v is None or math.isfinite(v) else None


def _check_source(holdout_size: int, holdout_from: str) -> None:
    if holdout_size <= 0:
        raise EdgeslimError(f"invalid --holdout-size {holdout_size}: use a positive number of inputs")
    if holdout_from not in HOLDOUT_SOURCES:
        raise EdgeslimError(f"invalid --holdout-from {holdout_from!r}: use calib or data")


def _fake_quant_outputs(gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                        batches_of) -> dict[str, list[torch.Tensor]]:
    """Outputs of the FP32 model (key ``fp32``) and of the fake-quant model under each plan, batch by batch."""
    chunks: dict[str, list[list[torch.Tensor]]] = {k: [] for k in ("fp32", *plans)}
    with torch.no_grad():
        for x in batches_of:
            t = torch.from_numpy(x)
            chunks["fp32"].append(mp.as_outputs(model(t)))
            for k, plan in plans.items():
                ptq.apply_plan(gm, config, plan)
                ptq.set_mode(gm, "quant")
                chunks[k].append(mp.as_outputs(gm(t)))
    return {k: [torch.cat([c[i] for c in v]) for i in range(len(v[0]))] for k, v in chunks.items()}


# ----------------------------------------------------------------------------- classify

def onnx_top1(paths: dict[str, Path], test: ImageDataset, batch_size: int, desc: str,
              indices: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 of several ONNX models on ``test`` (or its ``indices``) in onnxruntime, decoding each batch once."""
    sessions = {k: ort_eval.session(p, threads=0) for k, p in paths.items()}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for x, _ in batches(test, batch_size, indices, desc=desc):
        for k, s in sessions.items():
            outs[k].append(ort_eval.predict(s, x, batch_size))
    labels = test.labels if indices is None else test.labels[indices]
    return {k: metrics.top1(np.concatenate(v), labels) for k, v in outs.items()}


class Classify:
    """Labelled images; top-1 of the first output."""

    name, metric_key = "classify", "top1"

    def __init__(self, calib: ImageDataset, test: ImageDataset, batch_size: int = 256) -> None:
        self.calib, self.test, self.batch_size = calib, test, batch_size

    def check(self, num_classes: int | None) -> None:
        if num_classes and len(self.test.classes) > num_classes:
            raise EdgeslimError(f"test data has {len(self.test.classes)} classes but the model predicts {num_classes}: "
                                "pass data for this model")

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str = "calib") -> Split:
        """Calibration images plus a class-balanced held-out subset, disjoint from them (from ``--calib-data`` or,
        with ``holdout_from="data"``, from ``--data``, whose other images then give the final numbers)."""
        _check_source(holdout_size, holdout_from)
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

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]:
        return onnx_top1(paths, self.test, self.batch_size, desc, indices)

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]:
        """Top-1 on the test set of the FP32 model and of the fake-quant model under each plan (one decode pass)."""
        xs = (x for x, _ in batches(self.test, self.batch_size, indices, desc="evaluating on the test set"))
        outs = _fake_quant_outputs(gm, config, plans, model, xs)
        labels = self.test.labels if indices is None else self.test.labels[indices]
        return {k: metrics.top1(v[0].numpy(), labels) for k, v in outs.items()}


# ----------------------------------------------------------------------------- fidelity

class Fidelity:
    """Label-free: model inputs as arrays; the worst output's SQNR (dB) against the FP32 model."""

    name, metric_key = "fidelity", "sqnr_db"

    def __init__(self, calib: np.ndarray, test: np.ndarray, batch_size: int = 64, seed: int = 0) -> None:
        self.calib_x, self.test_x, self.batch_size, self.seed = calib, test, batch_size, seed

    def check(self, num_classes: int | None) -> None:
        return None

    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str = "calib") -> Split:
        """Seeded: ``calib_size`` calibration inputs, and a held-out subset disjoint from them (the rest of the
        calibration inputs, or of ``--data`` with ``holdout_from="data"``)."""
        _check_source(holdout_size, holdout_from)
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(self.calib_x))
        n_cal = min(config.calib_size, len(order))
        src = self.calib_x if holdout_from == "calib" else self.test_x
        rest = order[n_cal:] if holdout_from == "calib" else rng.permutation(len(self.test_x))
        minimum = 8 + (8 if holdout_from == "data" else 0)
        if len(rest) < minimum:
            what = ("--calib-data holds no inputs beyond the --calib-size used for calibration" if holdout_from == "calib"
                    else "--data has too few inputs")
            raise EdgeslimError(f"{what} for a held-out subset of at least 8: add inputs, lower --calib-size, or use "
                                "--holdout-from data")
        size = min(holdout_size, len(rest) - (8 if holdout_from == "data" else 0))
        hold = np.sort(rest[:size])
        eval_idx = (np.arange(len(self.test_x)) if holdout_from == "calib"
                    else np.setdiff1d(np.arange(len(self.test_x)), hold))
        return Split(self.calib_x[np.sort(order[:n_cal])], torch.from_numpy(src[hold]), mp.sqnr_metric(), eval_idx,
                     holdout_from)

    def _test(self, indices: np.ndarray | None) -> np.ndarray:
        return self.test_x if indices is None else self.test_x[indices]

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]:
        """Worst-output SQNR of each ONNX model against the ``fp32`` one, all run in onnxruntime."""
        if "fp32" not in paths:
            raise ValueError("fidelity scoring needs the FP32 model under the key 'fp32'")
        x = self._test(indices)
        outs = {k: ort_eval.predict_all(ort_eval.session(p, threads=0), x, self.batch_size) for k, p in paths.items()}
        ref = [torch.from_numpy(v) for v in outs["fp32"].values()]
        return {k: mp.worst_sqnr([torch.from_numpy(v) for v in o.values()], ref) for k, o in outs.items()}

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]:
        """Worst-output SQNR of the fake-quant model under each plan against the FP32 model, in PyTorch."""
        x = self._test(indices)
        outs = _fake_quant_outputs(gm, config, plans, model,
                                   (x[i:i + self.batch_size] for i in range(0, len(x), self.batch_size)))
        return {k: mp.worst_sqnr(v, outs["fp32"]) for k, v in outs.items()}
