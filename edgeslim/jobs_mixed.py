"""The ``sensitivity`` and ``mixed`` jobs: per-layer sweeps, group tables and the budgeted search, into one folder.

Data roles (so the search never tunes on the images it reports): calibration images come from
``--calib-data`` (seeded, class-balanced); a *held-out* subset scores the sweeps and the search. By default
(``holdout_from="calib"``) it is taken from ``--calib-data``, disjoint from the calibration images, and every
``--data`` image is used for the final numbers. With ``holdout_from="data"`` it is a seeded, class-balanced
subset of ``--data`` and the final numbers use the *other* ``--data`` images: use it when the calibration
source is training data the model has memorized (quantization then costs less accuracy there than on new
images, so a budget met on it can be missed on the test set). Outputs are staged and
moved in at the end (``summary.json`` last), as ``quantize`` does.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from . import api
from .algorithms import mixed_precision as mp
from .algorithms import ptq
from .config import MixedPlan, PTQConfig
from .data import ImageDataset, batches, calibration_indices
from .errors import EdgeslimError
from .eval import metrics, ort as ort_eval
from .export.onnx_qdq import save_onnx, to_onnx
from .jobs import MeasureOptions
from .lower import lower
from .models import ModelInfo
from .quant.precision import LayerPrecision
from .report.mixed_html import write_mixed_report, write_sensitivity_report


HOLDOUT_SOURCES = ("calib", "data")


@dataclass(frozen=True)
class MixedData:
    calib: np.ndarray
    holdout_x: torch.Tensor
    holdout_y: np.ndarray
    eval_idx: np.ndarray  # the --data images the final numbers use (all of them unless the holdout came from there)
    holdout_from: str = "calib"


def load_mixed_data(calib_ds: ImageDataset, config: PTQConfig, holdout_size: int, test_ds: ImageDataset,
                    holdout_from: str = "calib") -> MixedData:
    """Calibration images plus a class-balanced held-out subset (see the module docstring for its source)."""
    if holdout_size <= 0:
        raise EdgeslimError(f"invalid --holdout-size {holdout_size}: use a positive number of images")
    if holdout_from not in HOLDOUT_SOURCES:
        raise EdgeslimError(f"invalid --holdout-from {holdout_from!r}: use calib or data")
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
    return MixedData(calib, torch.from_numpy(xh), src.labels[hold], eval_idx, holdout_from)


def calibrated(model: nn.Module, info: ModelInfo, data: MixedData, config: PTQConfig) -> fx.GraphModule:
    per_plan = [a for a in config.algorithms if a != "cle"]
    if per_plan:  # they depend on the plan: the search re-freezes hundreds of plans from one calibration
        raise EdgeslimError(f"--algorithm {','.join(per_plan)} runs on one plan, not inside the search: search "
                            "without it, then `edgeslim quantize --plan plan.json --algorithm ...`")
    gm = ptq.prepare(model, info.input_shape, config)
    x = torch.from_numpy(data.calib)
    ptq.calibrate(gm, lambda: (x[i:i + 128] for i in range(0, len(x), 128)), progress=True)
    return ptq.freeze(gm, config)


def _start(model, info, calib_ds, test_ds, config, holdout_size, holdout_from) -> tuple[MixedData, fx.GraphModule]:
    """Load calibration + held-out images and calibrate once (the common start of both jobs)."""
    data = load_mixed_data(calib_ds, config, holdout_size, test_ds, holdout_from)
    return data, calibrated(model, info, data, config)


def _staged(out: Path, work) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        summary = work(stage)
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "summary.json"):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _check_classes(info: ModelInfo, test_ds: ImageDataset) -> None:
    if info.num_classes and len(test_ds.classes) > info.num_classes:
        raise EdgeslimError(f"test data has {len(test_ds.classes)} classes but the model predicts {info.num_classes}: "
                            "pass data for this model")


# ----------------------------------------------------------------------------- latency / export helpers

class OnnxBench:
    """Exports frozen plans to ONNX in a work folder and times them against the FP32 model (paired)."""

    def __init__(self, model: nn.Module, info: ModelInfo, work: Path, measure: MeasureOptions,
                 rounds: int = 100) -> None:
        self.info, self.work, self.measure, self.rounds = info, work, measure, rounds
        self.fp32 = api.export_fp32_onnx(model, info.input_shape, work / "model_fp32.onnx")
        self.counter = 0

    def export(self, gm: fx.GraphModule, name: str | None = None) -> Path:
        self.counter += 1
        path = self.work / (name or f"candidate_{self.counter}.onnx")
        return save_onnx(to_onnx(lower(gm, self.info.input_shape)), path)

    def latency(self, path: Path, batch: int = 1) -> tuple[float, float]:
        s = ort_eval.latency_samples({"fp32": self.fp32, "m": path}, self.info.input_shape, batch,
                                     threads=self.measure.threads, rounds=self.rounds)
        return statistics.median(s["m"]), ort_eval.paired_ratio(s, "m", "fp32")

    def latency_of(self, gm: fx.GraphModule) -> tuple[float, float]:
        path = self.export(gm, "candidate.onnx")
        return self.latency(path)


def onnx_top1(paths: dict[str, Path], test_ds: ImageDataset, batch_size: int, desc: str,
              indices: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 of several ONNX models on the test set (or its ``indices``), decoding each batch once."""
    sessions = {k: ort_eval.session(p, threads=0) for k, p in paths.items()}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    for x, _ in batches(test_ds, batch_size, indices, desc=desc):
        for k, s in sessions.items():
            outs[k].append(ort_eval.predict(s, x, batch_size))
    labels = test_ds.labels if indices is None else test_ds.labels[indices]
    return {k: metrics.top1(np.concatenate(v), labels) for k, v in outs.items()}


def torch_top1(gm: fx.GraphModule, config: PTQConfig, plans: dict[str, MixedPlan | None], model: nn.Module,
               test_ds: ImageDataset, batch_size: int, indices: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 on the test set of the FP32 model and of the fake-quant model under each plan (one decode pass)."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in ("fp32", *plans)}
    with torch.no_grad():
        for x, _ in batches(test_ds, batch_size, indices, desc="evaluating on the test set"):
            t = torch.from_numpy(x)
            outs["fp32"].append(model(t).numpy())
            for k, plan in plans.items():
                ptq.apply_plan(gm, config, plan)
                ptq.set_mode(gm, "quant")
                outs[k].append(gm(t).numpy())
    labels = test_ds.labels if indices is None else test_ds.labels[indices]
    return {k: metrics.top1(np.concatenate(v), labels) for k, v in outs.items()}


# ----------------------------------------------------------------------------- sensitivity job

def run_sensitivity(model: nn.Module, info: ModelInfo, calib_ds: ImageDataset, test_ds: ImageDataset,
                    config: PTQConfig, out: Path, *, high: LayerPrecision, holdout_size: int = 1000,
                    groups: dict[str, tuple[str, ...]] | None = None, group_table: bool = True,
                    holdout_from: str = "calib", measure: MeasureOptions = MeasureOptions()) -> dict:
    """Both per-layer sweeps on the held-out subset, and the group table on the test set."""
    _check_classes(info, test_ds)

    def work(stage: Path) -> dict:
        t0 = time.perf_counter()
        data, gm = _start(model, info, calib_ds, test_ds, config, holdout_size, holdout_from)
        sens = mp.sensitivity(gm, config, data.holdout_x, data.holdout_y, high=high, progress=True)
        summary = {"model": info.name, "config": config.to_dict(), "sensitivity": sens,
                   "images": {"calibration": int(len(data.calib)), "holdout": int(len(data.holdout_y)),
                              "holdout_from": holdout_from, "test": int(len(data.eval_idx))}}
        if group_table:
            summary["groups"] = run_group_table(gm, model, info, config, test_ds, stage, groups, high, measure,
                                                data.eval_idx)
        summary["total_seconds"] = time.perf_counter() - t0
        write_sensitivity_report(summary, stage / "report.html")
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    return _staged(out, work)


def run_group_table(gm: fx.GraphModule, model: nn.Module, info: ModelInfo, config: PTQConfig,
                    test_ds: ImageDataset, stage: Path, groups: dict[str, tuple[str, ...]] | None,
                    high: LayerPrecision, measure: MeasureOptions, indices: np.ndarray | None = None) -> dict:
    """Seed 002's Table 2: each combination of groups at high precision (the rest quantized) exported to
    ONNX, with test top-1 (onnxruntime), stored size and paired latency vs FP32."""
    groups = groups or mp.default_groups(gm)
    mp.check_groups(gm, groups)
    names = list(groups)
    default = config.default_precision
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        bench = OnnxBench(model, info, Path(tmp), measure)
        rows, paths = [], {"fp32": bench.fp32}
        for quantized in mp.group_combinations(names):
            precisions = {g: (default if g in quantized else high) for g in names}
            ptq.apply_plan(gm, config, mp.group_plan(groups, precisions))
            key = "q:" + ",".join(quantized)
            paths[key] = bench.export(gm, f"groups_{len(rows)}.onnx")
            rows.append({"quantized": list(quantized),
                         "precision": {g: str(precisions[g]) for g in names},
                         "weight_bytes": lower(gm, info.input_shape).weight_bytes(),
                         "onnx_bytes": paths[key].stat().st_size, "key": key})
        top1 = onnx_top1(paths, test_ds, measure.batch_size, f"evaluating {len(paths)} group combinations", indices)
        for row in rows:
            row["top1"] = top1[row["key"]]
            ms, ratio = bench.latency(paths[row["key"]])
            row.update(latency_ms=ms, latency_over_fp32=ratio, fps=1000.0 / ms)
    ptq.apply_plan(gm, config, None)
    return {"groups": {g: list(p) for g, p in groups.items()}, "high": str(high), "low": str(default),
            "fp32_top1": top1["fp32"], "fp32_bytes": int(4 * sum(p.numel() for p in model.parameters())),
            "rows": rows}


# ----------------------------------------------------------------------------- mixed job

def run_mixed(model: nn.Module, info: ModelInfo, calib_ds: ImageDataset, test_ds: ImageDataset,
              config: PTQConfig, out: Path, *, budget: mp.Budget, high: LayerPrecision, holdout_size: int = 1000,
              holdout_from: str = "calib", measure: MeasureOptions = MeasureOptions()) -> dict:
    """Search a mixed-precision plan under ``budget`` and verify it on the test set, in PyTorch and onnxruntime."""
    _check_classes(info, test_ds)

    def work(stage: Path) -> dict:
        t0 = time.perf_counter()
        data, gm = _start(model, info, calib_ds, test_ds, config, holdout_size, holdout_from)
        sens = mp.sensitivity(gm, config, data.holdout_x, data.holdout_y, high=high, sweeps=("keep_high",),
                              progress=True)
        order = [r["name"] for r in sorted(sens["rows"], key=lambda r: (-r["keep_high"]["delta"],
                                                                         -r["keep_high"]["sqnr_db"]))]
        with tempfile.TemporaryDirectory(dir=stage) as tmp:
            bench = OnnxBench(model, info, Path(tmp), measure)
            res = mp.search(gm, config, data.holdout_x, data.holdout_y, budget, input_shape=info.input_shape,
                            high=high, order=order, latency_of=bench.latency_of, progress=True)
            frontier = mp.measure_latency(gm, config, res.candidates, bench.latency_of, progress=True)
            chosen = res.chosen
            ptq.apply_plan(gm, config, chosen.plan)
            mixed_path = bench.export(gm, "model_mixed.onnx")
            ptq.apply_plan(gm, config, None)
            uniform_path = bench.export(gm, "model_uniform.onnx")
            lat = {}  # model -> (ms b1, ratio b1, ms b64, ratio b64)
            for key, path in (("uniform", uniform_path), ("mixed", mixed_path)):
                lat[key] = bench.latency(path, 1) + bench.latency(path, 64)
            top1 = torch_top1(gm, config, {"uniform": None, "mixed": chosen.plan}, model, test_ds, measure.batch_size,
                              data.eval_idx)
            onnx = onnx_top1({"fp32": bench.fp32, "uniform": uniform_path, "mixed": mixed_path}, test_ds,
                             measure.batch_size, "evaluating the ONNX models", data.eval_idx)
            sizes = {"fp32": bench.fp32.stat().st_size, "uniform": uniform_path.stat().st_size,
                     "mixed": mixed_path.stat().st_size}
            fp32_ms = bench.latency(bench.fp32, 1)[0]
            for p in (bench.fp32, mixed_path):
                shutil.copy(p, stage / p.name)
        ptq.apply_plan(gm, config, chosen.plan)
        fractions = mp.high_fractions(mp.layer_costs(gm), chosen.plan, config.default_precision)
        chosen.plan.save(stage / "plan.json")
        summary = {
            "model": info.name,
            "images": {"calibration": int(len(data.calib)), "holdout": int(len(data.holdout_y)),
                       "holdout_from": holdout_from, "test": int(len(data.eval_idx))},
            "budget": {"max_drop": budget.max_drop, "max_size_bytes": budget.max_size_bytes,
                       "max_latency_ms": budget.max_latency_ms},
            "fp32": {"top1": top1["fp32"], "holdout_top1": res.fp32_top1, "onnx_top1": onnx["fp32"],
                     "size_bytes": sizes["fp32"], "latency_ms": fp32_ms},
            "uniform": {"top1": top1["uniform"], "holdout_top1": res.uniform.top1, "onnx_top1": onnx["uniform"],
                        "size_bytes": res.uniform.size_bytes, "onnx_bytes": sizes["uniform"],
                        "latency_ms": {"batch1": lat["uniform"][0], "batch64": lat["uniform"][2]},
                        "latency_over_fp32": {"batch1": lat["uniform"][1], "batch64": lat["uniform"][3]}},
            "mixed": {"top1": top1["mixed"], "holdout_top1": chosen.top1, "holdout_drop_se": res.drop_se,
                      "plan": chosen.plan.to_dict(),
                      "high_precision_layers": list(chosen.high_layers),
                      "high_precision_mac_fraction": fractions["mac_fraction"],
                      "high_precision_param_fraction": fractions["param_fraction"],
                      "size_bytes": chosen.size_bytes, "onnx_bytes": sizes["mixed"],
                      "latency_ms": {"batch1": lat["mixed"][0], "batch64": lat["mixed"][2]},
                      "latency_over_fp32": {"batch1": lat["mixed"][1], "batch64": lat["mixed"][3]}},
            "onnx_mixed": {"top1": onnx["mixed"]},
            "met": res.met,
            "met_on_test": budget.max_drop is None or top1["fp32"] - top1["mixed"] <= budget.max_drop + 1e-12,
            "reason": res.reason,
            "high": str(high), "low": str(config.default_precision),
            "search": {"seconds": res.seconds, "sensitivity_seconds": sens["total_seconds"],
                       "order": order, "steps": [c.to_dict() for c in res.steps]},
            "frontier": [c.to_dict() for c in frontier],
            "candidates": [c.to_dict() for c in res.candidates],
            "config": config.to_dict(),
            "total_seconds": time.perf_counter() - t0,
        }
        write_mixed_report(summary, stage / "report.html")
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    return _staged(out, work)
