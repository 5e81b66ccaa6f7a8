"""Mixed precision: per-layer sensitivity and a budgeted search (named groups of layers: ``layer_groups``).

All of it works on one prepared and calibrated fake-quant model (``ptq.prepare`` + ``ptq.calibrate``):
the observers keep the statistics of the FP32 activations, so every plan is evaluated by re-freezing
(``ptq.apply_plan``, no calibration pass) and running the evaluation inputs once. The FP32 outputs are
computed once and reused for every score.

The score is a ``Metric``, so the same sweeps and search serve every task: top-1 on labelled inputs
(``top1_metric``; budgets in points) or, label-free, the worst output's SQNR against the FP32 model
(``sqnr_metric``; budgets as a floor in dB).

* ``sensitivity``: the per-layer sweep of Kim et al.'s mixed-precision study (one layer kept at high
  precision, the rest quantized) and its mirror (one layer quantized, the rest high precision), with the
  metric, output SQNR and MSE per layer.
* ``search``: greedy by sensitivity with verification: layers are promoted to the high precision in
  sensitivity order and every step is evaluated, until the budget holds; a trimming pass then tries to
  drop each promotion again (least sensitive first) and keeps the drop when the budget still holds.
  Every evaluated plan is a candidate of the accuracy / size / latency Pareto frontier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

from ..config import Budget, MixedPlan, PTQConfig
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..eval.profile import profile
from ..export.onnx_qdq import to_onnx
from ..graph import ops
from ..lower import lower
from ..quant.precision import FP32, LayerPrecision
from ..quant.primitives import sqnr_db
from . import ptq

__all__ = ["Metric", "top1_metric", "worst_sqnr", "sqnr_metric", "as_metric", "Score", "as_outputs", "fixed_batch",
           "outputs_of", "score_outputs", "score", "paired_drop_se", "fp32_outputs", "PlanOutputs", "onnx_outputs",
           "evaluate_plan", "evaluate_plans", "LayerCost", "layer_costs", "unit_rows", "high_fractions",
           "plan_size_bytes", "keep_high_plan", "only_quantized_plan", "sensitivity", "promotion_order",
           "Candidate",
           "SearchResult", "LatencyFn", "PlansLatencyFn", "search", "measure_latency", "pareto"]


# ----------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Metric:
    """How a plan is scored from the model's outputs on the held-out inputs (higher is better), and the unit of
    a budget in it.

    ``fn(outputs, fp32_outputs) -> value``: each a list of tensors, one per model output. ``per_unit``: budget
    units per unit of value (100 when the value is a fraction of inputs and budgets are in points; 1 for dB).
    ``hits``: for per-input metrics (top-1), the per-input 0/1 vector, used for the standard error of a drop.
    """

    name: str
    unit: str
    per_unit: float
    fn: Callable[[list[torch.Tensor], list[torch.Tensor]], float]
    hits: Callable[[list[torch.Tensor]], np.ndarray] | None = None

    def __call__(self, outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        return float(self.fn(outputs, reference))

    def describe(self) -> dict:
        return {"name": self.name, "unit": self.unit, "per_unit": self.per_unit}


def top1_metric(labels: np.ndarray) -> Metric:
    """Top-1 accuracy on labelled inputs (first output = class scores); budgets in points (1.0 = one point)."""
    labels = np.asarray(labels)

    def hits(outs: list[torch.Tensor]) -> np.ndarray:
        return (outs[0].argmax(1).numpy() == labels).astype(np.float64)

    return Metric("top-1", "points", 100.0, lambda outs, ref: float(hits(outs).mean()), hits)


def worst_sqnr(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The smallest SQNR (dB) over the model's outputs, each against the FP32 model's (inf when identical)."""
    return min(sqnr_db(r, o) for r, o in zip(reference, outputs))


def sqnr_metric() -> Metric:
    """Label-free: the worst output's SQNR vs the FP32 model (dB); budgets as a floor in dB (``Budget.min_score``)."""
    return Metric("SQNR", "dB", 1.0, worst_sqnr)


def as_metric(metric: Metric | np.ndarray) -> Metric:
    """A ``Metric``, or labels (top-1)."""
    return metric if isinstance(metric, Metric) else top1_metric(metric)


@dataclass(frozen=True)
class Score:
    value: float  # the metric's value
    sqnr_db: float  # worst output vs the FP32 model's on the same inputs
    mse: float  # mean over outputs


def as_outputs(y) -> list[torch.Tensor]:
    """A model's result as a list of output tensors."""
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _concat(chunks: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def fixed_batch(gm: nn.Module) -> bool:
    """True for a model imported from an ONNX file whose reshapes fold the batch of 1: it runs one input at a time."""
    return (getattr(gm, "meta", {}) or {}).get("onnx_dynamic_batch") is False


def outputs_of(gm: fx.GraphModule, x: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    batch_size = 1 if fixed_batch(gm) else batch_size
    with torch.no_grad():
        return _concat([as_outputs(gm(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def score_outputs(out: list[torch.Tensor], ref: list[torch.Tensor], metric: Metric) -> Score:
    mse = float(np.mean([float((o - r).double().pow(2).mean()) for o, r in zip(out, ref)]))
    return Score(metric(out, ref), worst_sqnr(out, ref), mse)


def score(gm: fx.GraphModule, x: torch.Tensor, metric: Metric | np.ndarray, ref: list[torch.Tensor]) -> Score:
    return score_outputs(outputs_of(gm, x), ref, as_metric(metric))


def paired_drop_se(metric: Metric, ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Standard error of the drop of ``out`` vs the reference on the same inputs (paired), in the metric's value:
    std(hit_ref - hit) / sqrt(n) for per-input metrics (top-1); 0 for whole-set metrics (SQNR). A budget much
    smaller than this cannot be checked on these inputs."""
    if metric.hits is None:
        return 0.0
    d = metric.hits(ref) - metric.hits(out)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")


def fp32_outputs(gm: fx.GraphModule, x: torch.Tensor) -> list[torch.Tensor]:
    """The (BN-folded) float model's outputs: every quantizer off."""
    with ptq.mode(gm, "off"):
        return outputs_of(gm, x)


PlanOutputs = Callable[[fx.GraphModule, torch.Tensor], list[torch.Tensor]]  # the frozen plan's outputs on x


def onnx_outputs(input_shape: tuple[int, ...], *, threads: int = 0, batch_size: int = 256) -> PlanOutputs:
    """Score plans on what is deployed: the frozen plan lowered and exported to ONNX in memory, run in onnxruntime
    (all cores by default; one input at a time for fixed-batch models). About 10x faster than the PyTorch
    simulation on ResNet-20 (1 s per plan on 2,000 images here), and it scores the file, not a simulation of it."""
    def run(gm: fx.GraphModule, x: torch.Tensor) -> list[torch.Tensor]:
        sess = ort_eval.session(to_onnx(lower(gm, input_shape)).SerializeToString(), threads=threads, inputs=len(x))
        outs = ort_eval.predict_all(sess, x.numpy(), 1 if fixed_batch(gm) else batch_size)
        return [torch.from_numpy(v) for v in outs.values()]
    return run


def evaluate_plan(gm: fx.GraphModule, config: PTQConfig, plan: MixedPlan | None, x: torch.Tensor,
                  metric: Metric | np.ndarray, ref: list[torch.Tensor], outputs: PlanOutputs | None = None) -> Score:
    """The plan's score: ``outputs`` (e.g. ``onnx_outputs``) runs the frozen plan, else the PyTorch simulation."""
    ptq.apply_plan(gm, config, plan)
    ptq.set_mode(gm, "quant")
    if outputs is not None:
        return score_outputs(outputs(gm, x), ref, as_metric(metric))
    return score(gm, x, metric, ref)


def _specs(gm: fx.GraphModule) -> dict[str, object]:
    return {n.name: ops.module(gm, n).spec for n in gm.graph.nodes
            if n.op == "call_module" and hasattr(ops.module(gm, n), "spec")}


def _downstream(gm: fx.GraphModule, changed: set[str]) -> set[str]:
    out: set[str] = set()
    for node in gm.graph.nodes:  # topological order: a node is downstream if any input is
        if node.name in changed or any(a.name in out for a in node.all_input_nodes):
            out.add(node.name)
    return out


class _CachedRun(fx.Interpreter):
    """Runs only the nodes downstream of what changed; every other value comes from a reference run."""

    def __init__(self, gm: fx.GraphModule, cache: dict[str, object], rerun: set[str] | None) -> None:
        super().__init__(gm)
        self.cache, self.rerun = cache, rerun

    def run_node(self, n: fx.Node):
        if self.rerun is not None and n.name not in self.rerun and n.name in self.cache:
            return self.cache[n.name]
        value = super().run_node(n)
        if self.rerun is None:
            self.cache[n.name] = value
        return value


def _cache_batch_size(gm: fx.GraphModule, budget_bytes: float = 1.5e9) -> int:
    if fixed_batch(gm):
        return 1
    per_image = sum(4 * int(np.prod(n.meta["shape"][1:])) for n in gm.graph.nodes if n.meta.get("shape"))
    return int(max(16, min(500, budget_bytes // max(1, per_image))))


def evaluate_plans(gm: fx.GraphModule, config: PTQConfig, reference: MixedPlan | None,
                   plans: list[MixedPlan], x: torch.Tensor, metric: Metric | np.ndarray, ref: list[torch.Tensor], *,
                   desc: str | None = None, outputs: PlanOutputs | None = None,
                   on_score: Callable[[int, Score], None] | None = None) -> list[Score]:
    """Score many plans that each differ a little from ``reference``, reusing the reference's activations.

    Per batch, the reference plan runs once with every node's output kept; each plan then recomputes
    only the nodes downstream of the quantizers and layers it changes (Jang et al.'s sweep changes one
    layer, so most of the network is reused). Exactly the same outputs as ``evaluate_plan``.
    """
    metric = as_metric(metric)
    if outputs is not None:  # each plan exported and run as a whole (no activation cache across plans)
        scores = []
        for i, plan in enumerate(tqdm(plans, desc=desc, unit="plan", disable=desc is None, leave=False)):
            scores.append(evaluate_plan(gm, config, plan, x, metric, ref, outputs))
            if on_score is not None:  # a result as soon as it is known
                on_score(i, scores[-1])
        ptq.apply_plan(gm, config, reference)
        return scores
    ptq.apply_plan(gm, config, reference)
    ptq.set_mode(gm, "quant")
    base = _specs(gm)
    reruns = []
    for plan in plans:
        ptq.apply_plan(gm, config, plan)
        specs = _specs(gm)
        reruns.append(_downstream(gm, {k for k, v in specs.items() if base[k] != v}))
    outs: list[list[torch.Tensor]] = [[] for _ in plans]
    bs = _cache_batch_size(gm)
    starts = range(0, len(x), bs)
    # the bar counts candidate plans (times the input batches when the inputs do not fit one cached batch)
    bar = tqdm(total=len(plans) * len(starts), desc=desc, unit="plan", disable=desc is None, leave=False,
               mininterval=0.5)
    with torch.no_grad():
        for i in starts:
            xb, cache = x[i:i + bs], {}
            ptq.apply_plan(gm, config, reference)
            _CachedRun(gm, cache, None).run(xb)
            for j, plan in enumerate(plans):
                ptq.apply_plan(gm, config, plan)
                outs[j].append(as_outputs(_CachedRun(gm, cache, reruns[j]).run(xb)))
                bar.update(1)
            del cache
    bar.close()
    ptq.apply_plan(gm, config, reference)
    scores = [score_outputs(_concat(chunks), ref, metric) for chunks in outs]
    for i, sc in enumerate(scores if on_score is not None else ()):  # every batch is needed before any score
        on_score(i, sc)
    return scores


# ----------------------------------------------------------------------------- layer costs

@dataclass(frozen=True)
class LayerCost:
    name: str
    macs: int
    params: int


def layer_costs(gm: fx.GraphModule) -> list[LayerCost]:
    """MACs (batch of one, from ``eval.profile``) and weight count of every weighted layer, in graph order."""
    macs = {r.name: r.macs for r in profile(gm)}
    return [LayerCost(ptq.op_name(gm, n), macs[str(n.target)], int(ops.module(gm, n).weight.numel()))
            for n in ptq.weighted_nodes(gm)]


def unit_rows(gm: fx.GraphModule) -> list[dict]:
    """What sweeps and searches choose among: every weighted layer, then every other op that reads a
    quantized tensor (residual adds, concatenations, pooling), whose input precision matters too."""
    costs = {c.name: c for c in layer_costs(gm)}
    rows = []
    for name in ptq.plan_names(gm):
        c = costs.get(name)
        rows.append({"name": name, "kind": "layer" if c else "op", "macs": c.macs if c else 0,
                     "params": c.params if c else 0})
    return rows


def high_fractions(costs: list[LayerCost], plan: MixedPlan, default: LayerPrecision) -> dict:
    """Share of MACs and of weights in layers whose weights or input run above the default precision."""
    high = [c for c in costs if _above(plan.precision_of(c.name, default), default)]
    return {"layers": [c.name for c in high],
            "mac_fraction": sum(c.macs for c in high) / max(1, sum(c.macs for c in costs)),
            "param_fraction": sum(c.params for c in high) / max(1, sum(c.params for c in costs))}


def _above(p: LayerPrecision, default: LayerPrecision) -> bool:
    return p.w.rank > default.w.rank or p.a.rank > default.a.rank


def plan_size_bytes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Stored parameter bytes of the currently frozen plan (integer weights packed at their bit width)."""
    return lower(gm, input_shape).weight_bytes()


# ----------------------------------------------------------------------------- sensitivity

def _default(config: PTQConfig) -> LayerPrecision:
    return config.default_precision


def keep_high_plan(layer: str, high: LayerPrecision) -> MixedPlan:
    """Jang et al.: ``layer`` at high precision, everything else at the config's bits."""
    return MixedPlan(((layer, high),))


def only_quantized_plan(layer: str, high: LayerPrecision, default: LayerPrecision) -> MixedPlan:
    """The mirror sweep: only ``layer`` quantized, everything else at high precision."""
    return MixedPlan((("*", high), (layer, default)))


def _delta(value: float, base: float) -> float | None:
    d = value - base
    return d if math.isfinite(d) else None  # e.g. SQNR against an FP32 base, which is infinite


def sensitivity(gm: fx.GraphModule, config: PTQConfig, x: torch.Tensor, metric: Metric | np.ndarray, *,
                high: LayerPrecision = LayerPrecision(FP32, FP32), sweeps: tuple[str, ...] = ("keep_high", "only_quantized"),
                progress: bool = False, outputs: PlanOutputs | None = None,
                on_row: Callable[[str, dict], None] | None = None) -> dict:
    """Both per-layer sweeps on a calibrated model; returns rows, reference scores and wall times.
    ``on_row(sweep, row)`` is called as soon as a row's score is known (to print the table as it grows).

    ``metric``: a ``Metric`` (or labels, for top-1). Each row: ``name``, ``macs``, ``params`` and per sweep
    ``score`` (the metric's value), ``delta`` (keep_high: gain over the uniformly quantized model;
    only_quantized: change from FP32; None where that is infinite), ``sqnr_db``, ``mse``.
    """
    t0 = time.perf_counter()
    metric = as_metric(metric)
    ref = fp32_outputs(gm, x)
    fp32_score = metric(ref, ref)
    default = _default(config)
    uniform = evaluate_plan(gm, config, None, x, metric, ref, outputs)
    rows = unit_rows(gm)
    seconds = {}
    for sweep in sweeps:
        ts = time.perf_counter()
        if sweep == "keep_high":
            reference, plans = None, [keep_high_plan(r["name"], high) for r in rows]
            base = uniform.value
        elif sweep == "only_quantized":
            reference = MixedPlan((("*", high),))
            plans = [only_quantized_plan(r["name"], high, default) for r in rows]
            base = fp32_score
        else:
            raise EdgeslimError(f"unknown sensitivity sweep {sweep!r}: use keep_high or only_quantized")
        def fill(i: int, sc: Score, sweep=sweep, base=base) -> None:
            rows[i][sweep] = {"score": sc.value, "delta": _delta(sc.value, base), "sqnr_db": sc.sqnr_db, "mse": sc.mse}
            if on_row is not None:
                on_row(sweep, rows[i])

        evaluate_plans(gm, config, reference, plans, x, metric, ref, outputs=outputs, on_score=fill,
                       desc=f"sensitivity ({sweep}, {len(plans)} ops)" if progress else None)
        seconds[sweep] = time.perf_counter() - ts
    ptq.apply_plan(gm, config, None)
    return {"images": int(len(x)), "metric": metric.describe(), "fp32_score": fp32_score,
            "uniform": {"score": uniform.value, "sqnr_db": uniform.sqnr_db, "mse": uniform.mse}, "rows": rows,
            "high": high.to_json(), "low": default.to_json(), "seconds": seconds,
            "total_seconds": time.perf_counter() - t0}


def promotion_order(sens: dict) -> list[str]:
    """Layers by what keeping each at high precision recovers (most first; SQNR breaks ties)."""
    return [r["name"] for r in sorted(sens["rows"], key=lambda r: (-(r["keep_high"]["delta"] or 0.0),
                                                                   -r["keep_high"]["sqnr_db"]))]


# ----------------------------------------------------------------------------- search

@dataclass
class Candidate:
    """One evaluated plan: the layers above the default precision and what that costs."""

    label: str
    plan: MixedPlan
    high_layers: tuple[str, ...]
    score: float  # the metric's value on the held-out inputs
    sqnr_db: float
    size_bytes: int
    mac_fraction: float
    latency_ms: float | None = None
    latency_ratio: float | None = None  # vs the FP32 ONNX model, paired in one run
    accepted: bool = True

    def to_dict(self) -> dict:
        return {"label": self.label, "high_layers": list(self.high_layers), "score": self.score,
                "sqnr_db": self.sqnr_db, "size_bytes": self.size_bytes, "high_precision_mac_fraction": self.mac_fraction,
                "latency_ms": self.latency_ms, "latency_over_fp32": self.latency_ratio, "accepted": self.accepted,
                "plan": self.plan.to_dict()}


@dataclass
class SearchResult:
    chosen: Candidate
    met: bool
    reason: str
    fp32_score: float
    uniform: Candidate
    metric: Metric
    steps: list[Candidate] = field(default_factory=list)
    frontier: list[Candidate] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0
    drop_se: float = 0.0  # standard error of the chosen plan's held-out drop (paired with FP32), in the metric's value


LatencyFn = Callable[[fx.GraphModule], tuple[float, float]]  # frozen model -> (ms, ratio vs FP32)
PlansLatencyFn = Callable[[list[MixedPlan]], list[tuple[float, float]]]  # plans -> (ms, ratio vs FP32) of each


def search(gm: fx.GraphModule, config: PTQConfig, x: torch.Tensor, metric: Metric | np.ndarray, budget: Budget, *,
           input_shape: tuple[int, ...], high: LayerPrecision, order: list[str] | None = None,
           latency_of: LatencyFn | None = None, progress: bool = False,
           outputs: PlanOutputs | None = None, on_step: Callable[[Candidate], None] | None = None) -> SearchResult:
    """Choose per-layer precisions under ``budget`` (greedy by sensitivity, verified at every step).

    ``metric`` scores a plan from the model's outputs (``top1_metric(labels)``, ``sqnr_metric()``; labels alone
    mean top-1). ``order`` is the promotion order (most sensitive first); without it Jang et al.'s keep-high sweep
    is run here. Scores are measured on ``x`` (a held-out subset); the caller verifies the chosen plan on the
    test set.
    """
    t0 = time.perf_counter()
    metric = as_metric(metric)
    ref = fp32_outputs(gm, x)
    fp32_score = metric(ref, ref)
    floor = budget.floor(metric, fp32_score)
    default, costs = _default(config), layer_costs(gm)
    names = [r["name"] for r in unit_rows(gm)]
    if order is None:
        order = promotion_order(sensitivity(gm, config, x, metric, high=high, sweeps=("keep_high",), progress=progress,
                                            outputs=outputs))
    unknown = sorted(set(order) - set(names))
    if unknown:
        raise EdgeslimError(f"search order names unknown layers {unknown}")
    evaluated: dict[tuple[str, ...], Candidate] = {}

    def candidate(high_layers: tuple[str, ...], label: str) -> Candidate:
        key = tuple(sorted(high_layers))
        if key not in evaluated:
            plan = MixedPlan(tuple((n, high) for n in sorted(high_layers, key=names.index)))
            s = evaluate_plan(gm, config, plan, x, metric, ref, outputs)
            frac = high_fractions(costs, plan, default)["mac_fraction"]
            c = Candidate(label, plan, tuple(sorted(high_layers, key=names.index)), s.value, s.sqnr_db,
                          plan_size_bytes(gm, input_shape), frac)
            if latency_of is not None and budget.max_latency_ms is not None:
                c.latency_ms, c.latency_ratio = latency_of(gm)
            evaluated[key] = c
        return evaluated[key]

    def acc_ok(c: Candidate) -> bool:
        return c.score >= floor - 1e-12

    def cost_ok(c: Candidate) -> bool:
        size_ok = budget.max_size_bytes is None or c.size_bytes <= budget.max_size_bytes
        lat_ok = budget.max_latency_ms is None or c.latency_ms is None or c.latency_ms <= budget.max_latency_ms
        return size_ok and lat_ok

    uniform = candidate((), "uniform")
    current, steps = uniform, [uniform]
    if on_step is not None:
        on_step(uniform)
    bar = tqdm(order, desc="mixed-precision search", unit="layer", disable=not progress, leave=False)
    for layer in bar:
        # Quality budget: promote in sensitivity order until it is met (a promotion that measures worse on
        # the subset is kept: higher precision does not hurt in expectation, and the trimming pass below
        # removes what the budget does not need). Size / latency budgets alone: keep a promotion only if
        # it verifies as an improvement and still fits.
        if budget.has_quality and acc_ok(current):
            break
        trial = candidate(current.high_layers + (layer,), f"+{layer}")
        better = trial.score > current.score or (trial.score == current.score and trial.sqnr_db > current.sqnr_db)
        if cost_ok(trial) and (budget.has_quality or better):
            current = trial
        else:
            trial = replace(trial, accepted=False)
        steps.append(trial)
        if on_step is not None:
            on_step(trial)
        bar.set_postfix(score=f"{current.score:.4f}", high=len(current.high_layers))
    if acc_ok(current) and budget.has_quality:  # trim promotions the budget does not need
        for layer in reversed(current.high_layers):
            trial = candidate(tuple(n for n in current.high_layers if n != layer), f"-{layer}")
            keep = acc_ok(trial) and cost_ok(trial)
            steps.append(trial if keep else replace(trial, accepted=False))
            if on_step is not None:
                on_step(steps[-1])
            if keep:
                current = trial
    met = acc_ok(current) and cost_ok(current)
    reason = _reason(met, current, fp32_score, floor, budget, metric)
    candidate(tuple(names), "all high")  # the other end of the frontier
    ptq.apply_plan(gm, config, current.plan)
    ptq.set_mode(gm, "quant")
    se = paired_drop_se(metric, ref, outputs(gm, x) if outputs is not None else outputs_of(gm, x))
    if budget.max_drop is not None and budget.max_drop < 2 * se * metric.per_unit:
        reason += (f"; caution: on {len(x)} held-out inputs the drop is known to +-{se * metric.per_unit:.2f} "
                   f"{metric.unit} (one standard error), too coarse for a {budget.max_drop:.2f}-{metric.unit} budget: "
                   "raise --holdout-size")
    cands = list(evaluated.values())
    return SearchResult(current, met, reason, fp32_score, uniform, metric, steps, pareto(cands), cands,
                        time.perf_counter() - t0, se)


def measure_latency(cands: list[Candidate], latencies_of: PlansLatencyFn) -> list[Candidate]:
    """Fill in the onnxruntime latency of every candidate that has none (``latencies_of``: all their plans at
    once, so they are timed side by side), then return the Pareto frontier over accuracy, size and latency."""
    todo = [c for c in cands if c.latency_ms is None]
    if todo:
        for c, (ms, ratio) in zip(todo, latencies_of([c.plan for c in todo]), strict=True):
            c.latency_ms, c.latency_ratio = ms, ratio
    return pareto(cands)


def _reason(met: bool, c: Candidate, fp32_score: float, floor: float, budget: Budget, metric: Metric) -> str:
    if math.isfinite(fp32_score):
        quality = f"drop {(fp32_score - c.score) * metric.per_unit:.2f} {metric.unit}"
    else:
        quality = f"{metric.name} {c.score * metric.per_unit:.2f} {metric.unit}"
    have = f"{quality} with {len(c.high_layers)} layer(s) at high precision " \
           f"({c.mac_fraction:.1%} of MACs), {c.size_bytes / 1024:.1f} KiB"
    if met:
        if not c.high_layers:
            return f"uniform quantization already meets the budget: {have}"
        return f"met: {have}"
    parts = []
    if budget.has_quality and c.score < floor - 1e-12:
        want = (f"budget {budget.max_drop:.2f} {metric.unit}" if budget.max_drop is not None and
                (budget.min_score is None or fp32_score - budget.max_drop / metric.per_unit >= budget.min_score)
                else f"floor {floor * metric.per_unit:.2f} {metric.unit}")
        parts.append(f"{metric.name}: best reachable {have}, {want}")
    if budget.max_size_bytes is not None and c.size_bytes > budget.max_size_bytes:
        parts.append(f"size {c.size_bytes / 1024:.1f} KiB > {budget.max_size_bytes / 1024:.1f} KiB even uniformly quantized")
    if budget.max_latency_ms is not None and c.latency_ms is not None and c.latency_ms > budget.max_latency_ms:
        parts.append(f"latency {c.latency_ms:.3f} ms > {budget.max_latency_ms:.3f} ms")
    return "not met: " + "; ".join(parts or ["budget not reachable with these precisions"])


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Non-dominated candidates: higher score, smaller size, lower latency (when measured)."""
    def dominates(a: Candidate, b: Candidate) -> bool:
        la = a.latency_ms if a.latency_ms is not None else 0.0
        lb = b.latency_ms if b.latency_ms is not None else 0.0
        no_worse = a.score >= b.score and a.size_bytes <= b.size_bytes and la <= lb
        better = a.score > b.score or a.size_bytes < b.size_bytes or la < lb
        return no_worse and better
    front = [c for c in cands if not any(dominates(o, c) for o in cands if o is not c)]
    return sorted(front, key=lambda c: c.size_bytes)
