"""The ``sensitivity`` and ``mixed`` jobs: per-layer sweeps, group tables and the budgeted search, into one folder.

One job per verb for every task (``tasks.Classify``: top-1 on labelled images; ``tasks.Fidelity``: label-free,
the worst output's SQNR against the FP32 model; ``tasks.Detect``: mAP@0.5:0.95, with mAP@0.5 and P / R / F1 beside
it): the task gives the data roles and the scores.

``sensitivity``'s per-layer sweeps are scored where the task says (``Task.sweep_inputs``, or ``sweep_on``): on the
held-out inputs, as below (classify, fidelity), or on every test input, each plan exported and scored in
onnxruntime with all of the task's score fields, as the group table is (detect).

Data roles (so the search never tunes on the inputs it reports): calibration inputs come from
``--calib-data`` (seeded; class-balanced when labelled); a *held-out* subset scores the sweeps and the search. By
default (``holdout_from="calib"``) it is taken from ``--calib-data``, disjoint from the calibration inputs, and
every ``--data`` input is used for the final numbers. With ``holdout_from="data"`` it is a seeded subset of
``--data`` and the final numbers use the *other* ``--data`` inputs: use it when the calibration source is
training data the model has memorized (quantization then costs less accuracy there than on new images, so a
budget met on it can be missed on the test set). Outputs are staged and moved in at the end (``summary.json``
last), as ``quantize`` does.

Cost: one calibration per job; each plan is re-frozen from its statistics, lowered and exported in memory. The
plans of a sweep, a group table or a search differ in a few layers, so both jobs score inside
``eval.ort.shared_work()``: every tensor two plans' files share on the same inputs (all of the network upstream
of the first layer they quantize differently, up to the last integer tensor before it) is computed once in
onnxruntime and the rest of each file runs from there, with the same bits as each whole file gives. Sharing has
a cost per file and per run, so ``mixed`` scores its final files (FP32, uniform, mixed: little in common) on
their own, and files run on few inputs get sessions of their own (``eval.ort.SHARED_MIN_INPUTS``).
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .. import api
from ..algorithms import layer_groups as lg
from ..algorithms import mixed_precision as mp
from ..algorithms import ptq
from ..config import Budget, MeasureOptions, MixedPlan, PTQConfig
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..export.onnx_qdq import save_onnx, to_onnx
from ..io.staging import staged
from ..lower import lower
from ..models import ModelInfo
from ..quant.precision import LayerPrecision
from ..report.mixed_html import write_mixed_report, write_sensitivity_report
from ..models import model_groups
from ..tasks import Split, Task, finite
from ..tasks.base import SWEEP_INPUTS

__all__ = ["calibrated", "SCORERS", "plan_outputs", "simulation_subset", "OnnxBench", "json_safe", "run_sensitivity",
           "sweeps_on_test", "layer_groups", "run_group_table", "run_mixed"]


def calibrated(model: nn.Module, info: ModelInfo, calib: np.ndarray, config: PTQConfig,
               batch_size: int = 128) -> fx.GraphModule:
    per_plan = [a for a in config.algorithms if a != "cle"]
    if per_plan:  # they depend on the plan: the search re-freezes hundreds of plans from one calibration
        raise EdgeslimError(f"--algorithm {','.join(per_plan)} runs on one plan, not inside the search: search "
                            "without it, then `edgeslim quantize --plan plan.json --algorithm ...`")
    gm = ptq.prepare(model, info.input_shape, config)
    x = torch.from_numpy(calib)
    bs = 1 if mp.fixed_batch(model) else batch_size
    ptq.calibrate(gm, lambda: (x[i:i + bs] for i in range(0, len(x), bs)), progress=True, total=-(-len(x) // bs))
    return ptq.freeze(gm, config)


def _start(model, info, task: Task, config, holdout_size, holdout_from) -> tuple[Split, fx.GraphModule]:
    """Split the data and calibrate once (the common start of both jobs)."""
    data = task.split(config, holdout_size, holdout_from)
    return data, calibrated(model, info, data.calib, config, task.calib_batch_size)


SCORERS = ("onnxruntime", "pytorch")


def plan_outputs(score_with: str, info: ModelInfo, measure: MeasureOptions):
    """How each plan is run on the held-out inputs: the exported file in onnxruntime (default) or the PyTorch
    simulation (``mp.evaluate_plans``'s activation cache)."""
    if score_with not in SCORERS:
        raise EdgeslimError(f"invalid --score-with {score_with!r}: use onnxruntime or pytorch")
    return mp.onnx_outputs(info.input_shape, batch_size=measure.batch_size) if score_with == "onnxruntime" else None


def simulation_subset(idx, n: int | None, seed: int):
    """The test inputs the PyTorch fake-quant model is scored on (it is slow; the files are scored on all): a
    seeded subset of ``n`` of ``idx`` in order (None: all)."""
    idx = np.asarray(idx)
    if n is None or n >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


def _images(data: Split) -> dict:
    return {"calibration": int(len(data.calib)), "holdout": int(len(data.holdout)),
            "holdout_from": data.holdout_from, "test": int(len(data.eval_idx))}


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

    def latencies(self, paths: Mapping[str, Path], batch: int = 1, desc: str | None = None
                  ) -> tuple[float, dict[str, tuple[float, float]]]:
        """``(FP32 median ms, {key: (median ms, paired ratio to FP32)})`` of many files, timed interleaved in
        groups beside the FP32 file (``eval.ort.paired_latencies``)."""
        return ort_eval.paired_latencies(paths, self.fp32, self.info.input_shape, batch, threads=self.measure.threads,
                                         rounds=self.rounds, seconds=self.measure.latency_seconds, desc=desc)

    def latency(self, path: Path, batch: int = 1) -> tuple[float, float]:
        return self.latencies({"m": path}, batch)[1]["m"]

    def latency_of(self, gm: fx.GraphModule) -> tuple[float, float]:
        path = self.export(gm, "candidate.onnx")
        return self.latency(path)

    def plan_latencies(self, gm: fx.GraphModule, config: PTQConfig, plans: list[MixedPlan | None]
                       ) -> list[tuple[float, float]]:
        """Each plan re-frozen, exported and then all timed together (``latencies``); ``gm`` is left frozen at the
        last plan."""
        paths = {}
        for i, plan in enumerate(plans):
            ptq.apply_plan(gm, config, plan)
            paths[str(i)] = self.export(gm, f"latency_{i}.onnx")
        lat = self.latencies(paths, desc="latency of candidates")[1]
        for p in paths.values():
            p.unlink()
        return [lat[str(i)] for i in range(len(plans))]


# ----------------------------------------------------------------------------- sensitivity job

def json_safe(obj):
    """Infinite floats (SQNR of identical outputs, the FP32 model's own SQNR) as None, so the summary is JSON."""
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run_sensitivity(model: nn.Module, info: ModelInfo, task: Task, config: PTQConfig, out: Path, *,
                    high: LayerPrecision, holdout_size: int = 1000, groups: dict[str, tuple[str, ...]] | None = None,
                    group_table: bool = True, holdout_from: str = "calib",
                    measure: MeasureOptions = MeasureOptions(), score_with: str = "onnxruntime",
                    on_row=None, sweep_on: str | None = None,
                    sweeps: tuple[str, ...] = ("keep_high", "only_quantized"), layers_only: bool = False) -> dict:
    """The per-layer sweeps (Jang et al.: each layer kept at ``high``; the mirror: each quantized alone) and the
    group table (every combination of ``groups``, default the model's declared groups or its top-level modules) on
    the test set. ``sweep_on``: ``holdout`` or ``test`` (None: ``task.sweep_inputs``); ``layers_only``: sweep the
    weighted layers, not the other ops (``test`` only). ``on_row(sweep, row)`` sees each sweep row as soon as it
    is scored."""
    task.check(info)
    sweep_on = sweep_on or task.sweep_inputs
    if sweep_on not in SWEEP_INPUTS:
        raise EdgeslimError(f"invalid sweep inputs {sweep_on!r}: use holdout or test")
    if sweep_on == "test" and score_with != "onnxruntime":
        raise EdgeslimError(f"--score-with {score_with}: {task.name} sensitivity scores every plan's file on the test "
                            "inputs, in onnxruntime")
    if sweep_on == "holdout" and layers_only:
        raise EdgeslimError(f"--layers-only applies to sweeps scored on the test inputs, not to {task.name}'s "
                            "held-out sweeps")
    outputs = plan_outputs(score_with, info, measure)

    def work(stage: Path) -> dict:
        with ort_eval.shared_work():
            return sensitivity_work(stage)

    def sensitivity_work(stage: Path) -> dict:
        t0 = time.perf_counter()
        if sweep_on == "holdout":
            data, gm = _start(model, info, task, config, holdout_size, holdout_from)
            sens = mp.sensitivity(gm, config, data.holdout, data.metric, high=high, sweeps=sweeps, progress=True,
                                  outputs=outputs, on_row=on_row)
            images, eval_idx = _images(data), data.eval_idx
        else:
            x_cal = task.calibration(config, info)
            gm = calibrated(model, info, x_cal, config, task.calib_batch_size)
            sens = sweeps_on_test(gm, model, info, task, config, stage, high, sweeps, layers_only, on_row)
            images, eval_idx = {"calibration": int(len(x_cal)), "test": task.test_size}, None
        summary = {"model": info.name, "task": task.name, "config": config.to_dict(), "sensitivity": sens,
                   "images": images, "scored_with": score_with}
        if group_table:
            summary["groups"] = run_group_table(gm, model, info, config, task, stage, groups, high, measure, eval_idx)
        summary["total_seconds"] = time.perf_counter() - t0
        summary = json_safe(summary)
        write_sensitivity_report(summary, stage / "report.html")
        return summary

    return staged(out, work)


def _change(value: float, base: float) -> float | None:
    d = value - base
    return d if math.isfinite(d) else None  # e.g. SQNR against the FP32 file, which is infinite


def sweeps_on_test(gm: fx.GraphModule, model: nn.Module, info: ModelInfo, task: Task, config: PTQConfig, stage: Path,
                high: LayerPrecision, sweeps: tuple[str, ...], layers_only: bool = False, on_row=None) -> dict:
    """The per-layer sweeps on every test input: each plan re-frozen from the one calibration, exported and scored
    in onnxruntime with all of the task's score fields (``task.score_fields``). Rows as ``mp.sensitivity``'s, each
    sweep's entry holding ``score`` (the metric), ``delta`` and every field with its change ``delta_<field>``
    (keep_high: from the uniformly quantized file; only_quantized: from the FP32 file)."""
    t0 = time.perf_counter()
    default, key = config.default_precision, task.metric_key
    rows = [r for r in mp.unit_rows(gm) if r["kind"] == "layer" or not layers_only]
    seconds = {}
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        fp32 = api.export_fp32_onnx(model, info.input_shape, Path(tmp) / "model_fp32.onnx")
        ref = {"fp32": fp32} if task.scores_against_fp32 else {}

        def scored(plan, desc: str) -> dict[str, float]:
            ptq.apply_plan(gm, config, plan)
            path = save_onnx(to_onnx(lower(gm, info.input_shape)), Path(tmp) / "plan.onnx")
            return task.score_fields({**ref, "plan": path}, desc)["plan"]

        fp32_fields = task.score_fields({"fp32": fp32}, "FP32")["fp32"]
        uniform = scored(None, f"all {default}")
        for sweep in sweeps:
            ts = time.perf_counter()
            if sweep == "keep_high":
                plan_of, base = (lambda n: mp.keep_high_plan(n, high)), uniform
            elif sweep == "only_quantized":
                plan_of, base = (lambda n: mp.only_quantized_plan(n, high, default)), fp32_fields
            else:
                raise EdgeslimError(f"unknown sensitivity sweep {sweep!r}: use keep_high or only_quantized")
            for r in rows:
                f = scored(plan_of(r["name"]), f"{sweep} {r['name']}")
                r[sweep] = {"score": f[key], "delta": _change(f[key], base[key]), **f,
                            **{f"delta_{k}": _change(v, base[k]) for k, v in f.items()}}
                if on_row is not None:
                    on_row(sweep, r)
            seconds[sweep] = time.perf_counter() - ts
    ptq.apply_plan(gm, config, None)
    return {"inputs": "test", "images": task.test_size, "metric": dict(task.metric_description),
            "fp32_score": fp32_fields[key], "fp32": fp32_fields, "uniform": {"score": uniform[key], **uniform},
            "rows": rows, "high": high.to_json(), "low": default.to_json(), "seconds": seconds,
            "total_seconds": time.perf_counter() - t0}


def layer_groups(model: nn.Module, info: ModelInfo, gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """The groups a model declares (a detector's backbone / neck / head), else one per top-level module."""
    declared = isinstance(getattr(model, "groups", None), Mapping)  # not a Conv2d's int ``groups``
    return model_groups(model, info) if declared else lg.default_groups(gm)


def run_group_table(gm: fx.GraphModule, model: nn.Module, info: ModelInfo, config: PTQConfig, task: Task,
                    stage: Path, groups: dict[str, tuple[str, ...]] | None, high: LayerPrecision,
                    measure: MeasureOptions, indices=None) -> dict:
    """Table 2 of the group study (Shin and Shin): each combination of groups at high precision (the rest
    quantized) exported to ONNX, with the task's test score (onnxruntime; ``scores``: all of its score fields),
    stored size and paired latency vs FP32."""
    groups = groups or layer_groups(model, info, gm)
    lg.check_groups(gm, groups)
    names = list(groups)
    default = config.default_precision
    with tempfile.TemporaryDirectory(dir=stage) as tmp:
        bench = OnnxBench(model, info, Path(tmp), measure)
        rows, paths = [], {"fp32": bench.fp32}
        for quantized in lg.group_combinations(names):
            precisions = {g: (default if g in quantized else high) for g in names}
            ptq.apply_plan(gm, config, lg.group_plan(groups, precisions))
            key, ir = "q:" + ",".join(quantized), lower(gm, info.input_shape)
            paths[key] = save_onnx(to_onnx(ir), Path(tmp) / f"groups_{len(rows)}.onnx")
            rows.append({"quantized": list(quantized),
                         "precision": {g: str(precisions[g]) for g in names},
                         "weight_bytes": ir.weight_bytes(),
                         "onnx_bytes": paths[key].stat().st_size, "key": key})
        fields = task.score_fields(paths, f"evaluating {len(paths)} group combinations", indices)
        fp32_ms, lat = bench.latencies({row["key"]: paths[row["key"]] for row in rows}, desc="latency of combinations")
        for row in rows:
            ms, ratio = lat[row["key"]]
            row.update(score=fields[row["key"]][task.metric_key], scores=fields[row["key"]],
                       latency_ms=ms, latency_over_fp32=ratio, fps=1000.0 / ms)
    ptq.apply_plan(gm, config, None)
    return {"groups": {g: list(p) for g, p in groups.items()}, "high": str(high), "low": str(default),
            "fp32_score": fields["fp32"][task.metric_key], "fp32_scores": fields["fp32"],
            "fp32_bytes": int(4 * sum(p.numel() for p in model.parameters())),
            "fp32_latency_ms": fp32_ms, "rows": rows}


# ----------------------------------------------------------------------------- mixed job

def run_mixed(model: nn.Module, info: ModelInfo, task: Task, config: PTQConfig, out: Path, *, budget: Budget,
              high: LayerPrecision, holdout_size: int = 1000, holdout_from: str = "calib",
              measure: MeasureOptions = MeasureOptions(), score_with: str = "onnxruntime", on_step=None) -> dict:
    """Search a mixed-precision plan under ``budget`` (in the task metric's units) and verify it on the test
    set, in PyTorch and onnxruntime. ``score_with``: what runs each candidate on the held-out inputs."""
    task.check(info)
    outputs = plan_outputs(score_with, info, measure)

    def work(stage: Path) -> dict:
        t0 = time.perf_counter()
        data, gm = _start(model, info, task, config, holdout_size, holdout_from)
        with tempfile.TemporaryDirectory(dir=stage) as tmp:
            bench = OnnxBench(model, info, Path(tmp), measure)
            # many plans on the same held-out inputs; the final files share little and are scored on their own
            # (fp32, uniform and mixed on 10,000 CIFAR images: 20 s alone vs 22-23 s shared)
            with ort_eval.shared_work():
                sens = mp.sensitivity(gm, config, data.holdout, data.metric, high=high, sweeps=("keep_high",),
                                      progress=True, outputs=outputs)
                order = mp.promotion_order(sens)
                res = mp.search(gm, config, data.holdout, data.metric, budget, input_shape=info.input_shape,
                                high=high, order=order, latency_of=bench.latency_of, progress=True, outputs=outputs,
                                on_step=on_step)
            frontier = mp.measure_latency(res.candidates, lambda plans: bench.plan_latencies(gm, config, plans))
            chosen = res.chosen
            ptq.apply_plan(gm, config, chosen.plan)
            mixed_path = bench.export(gm, "model_mixed.onnx")
            ptq.apply_plan(gm, config, None)
            uniform_path = bench.export(gm, "model_uniform.onnx")
            files = {"uniform": uniform_path, "mixed": mixed_path}
            fp32_ms, b1 = bench.latencies(files, 1)
            big = not mp.fixed_batch(model) and 64 in measure.latency_batches  # batch 64 where the model takes it
            b64 = bench.latencies(files, 64)[1] if big else {k: (None, None) for k in files}
            lat = {k: b1[k] + b64[k] for k in files}  # model -> (ms b1, ratio b1, ms b64, ratio b64)
            sim_idx = simulation_subset(data.eval_idx, measure.simulation_images, config.seed)
            sim = task.score_torch(gm, config, {"uniform": None, "mixed": chosen.plan}, model, sim_idx)
            onnx = task.score_onnx({"fp32": bench.fp32, "uniform": uniform_path, "mixed": mixed_path},
                                   "evaluating the ONNX models", data.eval_idx)
            sizes = {"fp32": bench.fp32.stat().st_size, "uniform": uniform_path.stat().st_size,
                     "mixed": mixed_path.stat().st_size}
            for p in (bench.fp32, mixed_path):
                shutil.copy(p, stage / p.name)
        ptq.apply_plan(gm, config, chosen.plan)
        fractions = mp.high_fractions(mp.layer_costs(gm), chosen.plan, config.default_precision)
        chosen.plan.save(stage / "plan.json")
        floor_on_test = budget.floor(res.metric, onnx["fp32"]) if budget.has_quality else None
        summary = {
            "model": info.name,
            "task": task.name,
            "metric": {**res.metric.describe(), "key": task.metric_key},
            "images": {**_images(data), "simulation": int(len(sim_idx))},
            "budget": budget.to_dict(),
            "fp32": {"score": sim["fp32"], "holdout_score": res.fp32_score, "onnx_score": onnx["fp32"],
                     "size_bytes": sizes["fp32"], "latency_ms": fp32_ms},
            "uniform": {"score": sim["uniform"], "holdout_score": res.uniform.score, "onnx_score": onnx["uniform"],
                        "size_bytes": res.uniform.size_bytes, "onnx_bytes": sizes["uniform"],
                        "latency_ms": {"batch1": lat["uniform"][0], "batch64": lat["uniform"][2]},
                        "latency_over_fp32": {"batch1": lat["uniform"][1], "batch64": lat["uniform"][3]}},
            "mixed": {"score": sim["mixed"], "holdout_score": chosen.score, "holdout_drop_se": res.drop_se,
                      "plan": chosen.plan.to_dict(),
                      "high_precision_layers": list(chosen.high_layers),
                      "high_precision_mac_fraction": fractions["mac_fraction"],
                      "high_precision_param_fraction": fractions["param_fraction"],
                      "size_bytes": chosen.size_bytes, "onnx_bytes": sizes["mixed"],
                      "latency_ms": {"batch1": lat["mixed"][0], "batch64": lat["mixed"][2]},
                      "latency_over_fp32": {"batch1": lat["mixed"][1], "batch64": lat["mixed"][3]}},
            "onnx_mixed": {"score": onnx["mixed"]},
            "met": res.met,
            "met_on_test": floor_on_test is None or onnx["mixed"] >= floor_on_test - 1e-12,  # the files, all test inputs
            "reason": res.reason,
            "high": str(high), "low": str(config.default_precision),
            "search": {"seconds": res.seconds, "sensitivity_seconds": sens["total_seconds"], "scored_with": score_with,
                       "order": order, "steps": [c.to_dict() for c in res.steps]},
            "frontier": [c.to_dict() for c in frontier],
            "candidates": [c.to_dict() for c in res.candidates],
            "config": config.to_dict(),
            "total_seconds": time.perf_counter() - t0,
        }
        summary = json_safe(summary)
        write_mixed_report(summary, stage / "report.html")
        return summary

    return staged(out, work)
