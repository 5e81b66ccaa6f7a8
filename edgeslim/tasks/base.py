"""The task protocol: how a job gets its data and scores a model, so that one job per verb serves every task.

A task answers, for the ``quantize`` / ``analyze`` job (``jobs.quantize``):

* ``check``: whether the model and the data fit this task (refused before any work);
* ``calibration``: the calibration inputs, in the model's channel order (and ``calib_batch_size``);
* ``preprocessing`` / ``metadata``: what the deployable files expect, written into the summary, ``encodings.json``
  and the ONNX files' ``metadata_props``;
* ``fp32_file``: the FP32 reference file (torch's export, or the user's own ONNX file);
* ``evaluate``: the task's scores of the deployed files (and of the PyTorch simulation, the integer engine with
  ``analyze``, the ``.tflite`` when written), as summary fields; ``latency``: the paired FP32 / INT8 timing;
  ``graph_key``: the summary entry that gets the INT8 file's graph statistics; ``write_report``: report.html;

and for the ``sensitivity`` and ``mixed`` jobs (``jobs.mixed``):

* ``split``: which inputs calibrate, which held-out inputs score the sweeps and the search (and with which
  ``Metric``), and which test inputs give the final numbers;
* ``score_onnx``: the metric of exported ONNX files on the test inputs, in onnxruntime; ``score_fields``: every
  score the task reports of each file (top-1; SQNR; mAP@0.5, mAP@0.5:0.95, precision / recall / F1), the metric
  among them under ``metric_key``; ``scores_against_fp32``: whether those need the FP32 file next to the others;
* ``sweep_inputs``: what ``sensitivity``'s per-layer sweeps are scored on by default: ``holdout`` (the held-out
  inputs, ``Metric`` of the PyTorch or onnxruntime outputs) or ``test`` (every test input, each plan's file in
  onnxruntime through ``score_fields``, as the group table is); ``test_size``: how many test inputs there are;
  ``metric_description``: the metric's name, unit and budget units per unit (``Metric.describe``);
* ``score_torch``: the metric of the PyTorch fake-quant model under several plans on the test inputs;

and for the ``qat`` job (``jobs.qat``), whose ``calib`` data are the training inputs:

* ``qat_loss``: the training objective on (student, FP32 teacher) outputs, or None for the labels'
  cross-entropy (with ``--kd`` distillation), and its one-line description;
* ``qat_setup``: called first, with the FP32 teacher: the training inputs, the PTQ start's calibration inputs and
  the summary's fields known before training (``QATSetup``); the task keeps what its scoring needs (the
  validation subset, the teacher's outputs);
* ``qat_score``: the score fields of a PyTorch model on the test inputs (``validation``: on the validation
  subset, after every epoch; the job reads ``metric_key`` from them);
* ``qat_files``: the scores of the exported FP32 / INT8 ONNX files (under ``qat_file_key``) and whatever else the
  task reports on them (latency, the export check).

The tasks: ``classify`` (top-1 on labelled images), ``detect`` (mAP of the known decoders) and ``fidelity``
(label-free: any model, scored by agreement with its FP32 self). Adding a task is one module in this package
plus its line in ``tasks/__init__.py`` and its branch in the CLI's task builder (docs/design.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import fx, nn

from ..algorithms import mixed_precision as mp
from ..algorithms import ptq
from ..config import AnalyzeOptions, MixedPlan, PTQConfig, QATConfig
from ..errors import EdgeslimError
from ..intgraph import IntGraph
from ..models import ModelInfo
from ..train.data import TrainData

__all__ = ["Split", "Deployed", "QATSetup", "Task", "HOLDOUT_SOURCES", "SWEEP_INPUTS", "finite", "check_source", "fake_quant_outputs",
           "TFLITE_RANGE_INPUTS"]

HOLDOUT_SOURCES = ("calib", "data")
SWEEP_INPUTS = ("holdout", "test")  # what sensitivity sweeps are scored on (Task.sweep_inputs)
TFLITE_RANGE_INPUTS = 256  # calibration inputs whose outputs set the int8 range of a .tflite's outputs


@dataclass(frozen=True)
class Split:
    """The data roles of a ``sensitivity`` / ``mixed`` run (see ``jobs.mixed``'s docstring)."""

    calib: np.ndarray  # model inputs that calibrate
    holdout: torch.Tensor  # inputs that score every plan
    metric: mp.Metric  # how the held-out outputs are scored
    eval_idx: np.ndarray  # the test inputs the final numbers use
    holdout_from: str = "calib"


@dataclass(frozen=True)
class Deployed:
    """What the ``quantize`` job hands a task to score: the quantized model, its two ONNX files, the calibration
    inputs, and the built ``.tflite`` (``export.tflm.build``'s result) with the formats to write, when asked."""

    q: object  # api.Quantized
    fp32: Path
    int8: Path
    calib: np.ndarray
    stage: Path  # the staging folder the job's files go to
    lite: tuple | None = None
    formats: tuple[str, ...] = ("onnx",)


@dataclass(frozen=True)
class QATSetup:
    """What a task hands the ``qat`` job before training (``Task.qat_setup``)."""

    data: TrainData  # training inputs in the model's order, labels (zeros without labels), the crops' pad value
    calib: np.ndarray | torch.Tensor  # the PTQ start's calibration inputs, drawn from the training inputs
    calib_batch_size: int
    fields: dict  # summary fields known before training: the data's description, the FP32 model's score if any


class Task(Protocol):
    name: str
    metric_key: str  # what the summary calls the score: "top1", "map50_95", "sqnr_db"
    graph_key: str  # the summary entry that holds the INT8 file's graph statistics
    calib_batch_size: int
    tflite_range_inputs: int
    sweep_inputs: str  # "holdout" or "test": what sensitivity sweeps are scored on by default (SWEEP_INPUTS)
    scores_against_fp32: bool  # score_fields needs the FP32 file (key "fp32") among the files it scores
    metric_description: dict  # {"name", "unit", "per_unit"}, as Metric.describe()
    test_size: int

    # quantize / analyze
    def check(self, info: ModelInfo) -> None: ...

    def calibration(self, config: PTQConfig, info: ModelInfo) -> np.ndarray: ...

    def preprocessing(self, info: ModelInfo) -> dict | str: ...

    def metadata(self, info: ModelInfo, config: PTQConfig) -> dict[str, str]: ...

    def fp32_file(self, model: nn.Module, info: ModelInfo, path: Path) -> Path: ...

    def evaluate(self, model: nn.Module, info: ModelInfo, d: Deployed, analyze: AnalyzeOptions | None) -> dict: ...

    def latency(self, d: Deployed, info: ModelInfo) -> dict: ...

    def write_report(self, summary: dict, info: ModelInfo, path: Path) -> None: ...

    # sensitivity / mixed
    def split(self, config: PTQConfig, holdout_size: int, holdout_from: str) -> Split: ...

    def score_onnx(self, paths: dict[str, Path], desc: str, indices: np.ndarray | None = None) -> dict[str, float]: ...

    def score_fields(self, paths: dict[str, Path], desc: str,
                     indices: np.ndarray | None = None) -> dict[str, dict[str, float]]: ...

    def score_torch(self, gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
                    indices: np.ndarray | None = None) -> dict[str, float]: ...

    # qat
    qat_file_key: str  # the summary entry of the INT8 file's scores ("onnx" for classify, "onnx_int8" otherwise)

    def qat_loss(self, cfg: QATConfig) -> tuple[Callable | None, str]: ...

    def qat_setup(self, teacher: nn.Module, info: ModelInfo, cfg: QATConfig, ptq_config: PTQConfig,
                  train_size: int | None, val_size: int | None, main: bool) -> QATSetup: ...

    def qat_score(self, m: nn.Module, desc: str | None, validation: bool = False) -> dict: ...

    def qat_files(self, gm: fx.GraphModule, graph: IntGraph, fp32: Path, int8: Path, info: ModelInfo) -> dict: ...


def finite(v: float | None) -> float | None:
    """JSON-safe: None for an infinite score (SQNR of identical outputs)."""
    return v if v is None or math.isfinite(v) else None


def check_source(holdout_size: int, holdout_from: str) -> None:
    if holdout_size <= 0:
        raise EdgeslimError(f"invalid --holdout-size {holdout_size}: use a positive number of inputs")
    if holdout_from not in HOLDOUT_SOURCES:
        raise EdgeslimError(f"invalid --holdout-from {holdout_from!r}: use calib or data")


def fake_quant_outputs(gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
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
