"""``edgeslim plan``: the TTA lightweighting guideline, planned by cost: stop at the cheapest road that meets the target.

First the quantization roads that leave the structure alone, cheapest first (``plan_roads``): W8A8 (G3), fewer
weight bits with BRECQ / AdaRound where the target packs them (G3), mixed precision by sensitivity (G4), FP16
(G4). A road whose stored size (computed exactly from the parameter count and bit widths) cannot fit, or that an
earlier road shows cannot win (more bits already too inaccurate, same int8 kernels already too slow), is skipped
with that reason. Only when no road meets the target do the structural steps run, in the guideline's order (G1
backbone, G2 factorization, G5 pruning; by magnitude when memory binds, by channel otherwise), each followed by
the quantization roads again. Every candidate is measured as the deployable ONNX file: held-out top-1 (training
images kept out of fine-tuning: every choice is made there), test top-1 (reported, never used to choose),
latency paired with FP32 in onnxruntime, stored bytes, time. The summary says why each step was taken or skipped.

Every fine-tuning step checkpoints into ``out/checkpoint_G<n>.pt`` (``train.checkpoint``); with ``resume`` the
finished steps load their final weights and the interrupted one continues exactly where its checkpoint was written.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import api
from ..algorithms import mixed_precision as mp, ptq
from ..algorithms.finetune import finetune
from ..config import PLAN_STEPS as STEPS, Budget, MixedPlan, PlanOptions, PTQConfig, Requirement
from ..data import ImageDataset
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..tasks import onnx_top1
from ..models import ModelInfo
from ..quant.precision import LayerPrecision
from .plan_roads import LOW_BITS, Road, container_bits, graph_bytes, int_weight_bytes, predicted_bytes, quant_roads
from ..targets import Target
from ..train.checkpoint import Checkpoint, params_digest
from ..train.data import TrainData, load_train

__all__ = ["STEP_NAMES", "Deployable", "Context", "export", "auto_sparsity", "holdout_top1", "measure",
           "tflm_ram_bytes", "step_checkpoint", "step_g1", "step_g2", "int_plan", "road_deployable", "mixed_search",
           "structural_drop", "mp_calibrated", "step_g5", "order_steps", "lowest_bits", "unmet", "road_skip",
           "try_roads", "run_plan", "check_resume", "split_holdout", "closest_road", "runnable_steps",
           "structural_skip", "structural_step", "summarize", "closest"]


STEP_NAMES = {"G1": "lighter backbone", "G2": "factorize heavy convs", "G3": "post-training quantization",
              "G4": "reduced / mixed precision", "G5": "pruning"}


@dataclass
class Deployable:
    """The current result: a float model (its structure after G1 / G2 / G5) and how it is deployed."""

    model: nn.Module
    fmt: str = "fp32"  # fp32 | fp16 | int8 | mixed
    plan: MixedPlan | None = None
    sparse: bool = False  # magnitude-pruned: size counted in the sparse format
    notes: list[str] = field(default_factory=list)
    w_bits: int = 8  # integer weight bits (int8 / mixed)
    method: str | None = None  # learned rounding ("adaround" / "brecq"); None: round-to-nearest


@dataclass
class Context:
    info: ModelInfo
    teacher: nn.Module
    train: TrainData
    test: ImageDataset
    calib: np.ndarray
    holdout: tuple[torch.Tensor, np.ndarray]
    config: PTQConfig
    target: Target
    requirement: Requirement
    options: PlanOptions
    work: Path
    fp32_onnx: Path
    epochs_per_step: float
    fp32_top1: float = 0.0
    fp32_holdout: float = 0.0  # the baseline's held-out top-1: every choice is made against it
    float_holdout: float = 0.0  # the current float structure's held-out top-1
    counter: int = 0
    checkpoints: Path | None = None  # folder of the fine-tuning checkpoints (None: no checkpoints)
    checkpoint_every: int | None = None
    resume: bool = False
    model_digest: str = ""  # the original model's weights: part of every checkpoint's identity

    def path(self, stem: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:02d}_{stem}.onnx"


# ----------------------------------------------------------------------------- deploy and measure

def export(d: Deployable, ctx: Context) -> tuple[Path, int]:
    """The ONNX file of ``d`` and the bytes ``ctx.target`` stores (``plan_roads.graph_bytes``)."""
    shape = ctx.info.input_shape
    if d.fmt in ("int8", "mixed"):
        config = replace(ctx.config, w_bits=d.w_bits, algorithms=(d.method,) if d.method else (),
                         iters=ctx.options.lowbit_iters)
        q = api.quantize(d.model, ctx.calib, config, plan=d.plan, input_shape=shape)
        return api.export_onnx(q, ctx.path(d.fmt)), graph_bytes(q.intgraph, ctx.target, d.sparse)
    fp32 = api.export_fp32_onnx(d.model, shape, ctx.path("fp32"))
    if d.fmt == "fp16":
        path = api.export_fp16_onnx(fp32, ctx.path("fp16"))
        return path, (_sparse_bytes(d.model, 16) if d.sparse else 2 * _params(d.model))
    return fp32, (_sparse_bytes(d.model, 32) if d.sparse else 4 * _params(d.model))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sparse_bytes(model: nn.Module, value_bits: int) -> int:
    """Bytes of the float model's tensors in their smallest sparse format, ``value_bits`` per stored value."""
    from ..algorithms.pruning import sparse_size_bytes

    return int(sparse_size_bytes(model, value_bits=value_bits).total_bytes)


def auto_sparsity(model: nn.Module, budget_bytes: float, value_bits: int) -> float:
    """The smallest sparsity (0.05 steps, at most 0.95) whose sparse storage fits ``budget_bytes``: integer
    widths (<= 8) counted as the quantized model stores them (BN folded, int32 biases), else the float tensors."""
    from ..algorithms import pruning

    for sp in np.arange(0.05, 0.951, 0.05):
        trial = copy.deepcopy(model)
        pruning.magnitude_prune(trial, float(sp))
        pruning.remove_masks(trial)
        size = int_weight_bytes(trial, value_bits, sparse=True) if value_bits <= 8 else _sparse_bytes(trial, value_bits)
        if size <= budget_bytes:
            return round(float(sp), 2)
    return 0.95


def holdout_top1(path: Path, ctx: Context) -> float:
    """Top-1 of an ONNX file on the held-out training images (what the planner decides on; never the test set)."""
    x, y = ctx.holdout
    pred = ort_eval.predict(ort_eval.session(path, threads=ctx.options.threads), x.numpy(), 500)
    return float((np.asarray(pred).reshape(len(y), -1).argmax(1) == y).mean())


def measure(d: Deployable, ctx: Context, step: str, seconds: float) -> dict:
    """Export ``d`` and measure it; ``step_seconds`` is ``seconds`` plus the export (quantization, reconstruction)."""
    t0 = time.perf_counter()
    path, size = export(d, ctx)
    seconds += time.perf_counter() - t0
    top1 = onnx_top1({"m": path}, ctx.test, 500, f"{step}: scoring")["m"]
    lat = ort_eval.latency_samples({"fp32": ctx.fp32_onnx, "m": path}, ctx.info.input_shape, 1,
                                   threads=ctx.options.threads, rounds=ctx.options.latency_rounds)
    inits = []
    for _ in range(3):
        t0 = time.perf_counter()
        ort_eval.session(path, threads=ctx.options.threads)
        inits.append(time.perf_counter() - t0)
    return {"step": step, "name": STEP_NAMES.get(step, step), "format": d.fmt, "w_bits": d.w_bits,
            "method": d.method, "top1": top1, "holdout_top1": holdout_top1(path, ctx), "onnx": path.name,
            "latency_ms": statistics.median(lat["m"]), "latency_vs_fp32": ort_eval.paired_ratio(lat, "m", "fp32"),
            "size_bytes": int(size), "onnx_bytes": path.stat().st_size, "init_s": statistics.median(inits),
            "params": _params(d.model), "step_seconds": seconds, "notes": list(d.notes), **tflm_ram_bytes(path, ctx)}


def tflm_ram_bytes(path: Path, ctx: Context) -> dict:
    """``{"ram_bytes": ...}`` under ``--max-ram-kb``: the tensor arena TFLM allocates for the file written as an int8
    ``.tflite`` (``export.tflm``; logits bounded from the weights), None when it has no all-int8 form; {} otherwise."""
    if ctx.requirement.max_ram_kb is None:
        return {}
    from ..export.tflm import arena_bytes, build
    from ..io.onnx_qdq_import import import_qdq

    try:
        fb, tg, _ = build(import_qdq(path))
    except EdgeslimError:
        return {"ram_bytes": None}
    return {"ram_bytes": arena_bytes(fb, (1, *tg.input_shape[1:], tg.input_shape[0]))}


def step_checkpoint(ctx: Context, step: str) -> Checkpoint | None:
    """``checkpoint_<step>.pt`` of a fine-tuning step: its identity is the original model's weights, the step, the
    target, the requirement and the plan options that shape the model (not threads or latency rounds)."""
    if ctx.checkpoints is None:
        return None
    settings = {k: None if k == "finetune" else v for k, v in ctx.options.to_dict().items()
                if k not in ("threads", "latency_rounds")}
    plan = {"step": step, "target": ctx.target.name, "requirement": asdict(ctx.requirement), **settings}
    return Checkpoint(ctx.checkpoints / f"checkpoint_{step}.pt", every=ctx.checkpoint_every,
                      identity={"model weights": ctx.model_digest, "plan": plan})


def _tune(model: nn.Module, ctx: Context, step: str, desc: str, on_step=None) -> dict | None:
    if ctx.epochs_per_step <= 0:
        return None
    cfg = replace(ctx.options.finetune, epochs=ctx.epochs_per_step)
    ckpt = step_checkpoint(ctx, step)
    return finetune(model, ctx.train, cfg, teacher=ctx.teacher, on_step=on_step, desc=desc, checkpoint=ckpt,
                    resume=ckpt is not None and ctx.resume and ckpt.path.exists())


# ----------------------------------------------------------------------------- the steps

def step_g1(d: Deployable, ctx: Context) -> str | None:
    if ctx.options.backbone is None:
        return ("skipped: no --backbone given (a swap starts the new backbone from random weights here, with no "
                "pretrained light backbones offline, so it needs a long distillation budget; see docs/design.md)")
    from ..algorithms.backbone import swap_backbone

    name, _, width = ctx.options.backbone.partition(":")
    model, record = swap_backbone(d.model, ctx.info.input_shape, backbone=name, width=float(width or 1.0),
                                  target=ctx.target)
    if record.macs_after >= record.macs_before:
        return (f"skipped: {ctx.options.backbone} ({record.macs_after:,} MACs) is not lighter than the current "
                f"model ({record.macs_before:,} MACs)")
    _tune(model, ctx, "G1", "G1 fine-tuning (KD)")
    d.model = model
    d.notes.append(f"G1: backbone {ctx.options.backbone} (random init, distilled), MACs {record.macs_before:,} -> "
                   f"{record.macs_after:,}")
    return None


def step_g2(d: Deployable, ctx: Context) -> str | None:
    from ..algorithms.factorize import choose_layers, factorize

    layers = choose_layers(d.model, ctx.info.input_shape, share=ctx.options.factor_share)
    if not layers:
        return "skipped: no convolution worth factorizing (only 1x1 / depthwise convs)"
    model, record = factorize(d.model, ctx.info.input_shape, layers=layers, method="separable",
                              macs_reduction=ctx.options.factor_reduction)
    _tune(model, ctx, "G2", "G2 fine-tuning")
    d.model = model
    d.notes.append(f"G2: {len(record.layers)} convs depthwise-separable ({', '.join(r.name for r in record.layers)}), "
                   f"MACs {record.model_macs_before:,} -> {record.model_macs_after:,}")
    return None


def int_plan(d: Deployable, ctx: Context) -> MixedPlan | None:
    """FP32 islands for the ops the target cannot run in integer (None when it runs them all)."""
    return ctx.target.plan(ptq.prepare(d.model, ctx.info.input_shape, ctx.config))


def road_deployable(road: Road, d: Deployable, ctx: Context) -> Deployable:
    """``d``'s structure deployed by ``road`` (a new Deployable sharing ``d``'s float model)."""
    method = None if d.sparse else road.method  # learned rounding may turn a pruned zero into one LSB
    cand = replace(d, fmt=road.fmt, w_bits=road.w_bits if road.fmt != "fp16" else 8, method=method,
                   plan=None, notes=list(d.notes))
    if road.fmt == "fp16":
        cand.notes.append("G4: whole model FP16" + ("" if ctx.target.fp16 else
                                                    f" (target {ctx.target.name} has no FP16 arithmetic: storage only)"))
        return cand
    cand.plan = int_plan(cand, ctx)
    if cand.plan is not None:
        cand.notes.append(f"G3: FP32 islands for ops {ctx.target.name} cannot run in integer: "
                          + ", ".join(n for n, _ in cand.plan.rules))
    if road.fmt == "mixed":
        return mixed_search(cand, ctx)
    if road.method and not method:
        cand.notes.append(f"G3: W{road.w_bits} round-to-nearest ({road.method} would turn pruned zeros into 1 LSB)")
    return cand


def mixed_search(d: Deployable, ctx: Context) -> Deployable:
    """G4: the weights at ``d.w_bits``, the most sensitive layers raised (to int8 where the target packs low-bit
    weights, else FP16) until the held-out drop is within the budget left after the structure's own drop. When
    no plan meets it, the search's closest plan is returned: its measured row says what it misses."""
    req = ctx.requirement
    budget = req.max_drop - structural_drop(ctx)
    high = LayerPrecision.parse("int8" if d.w_bits < 8 and ctx.target.packed_weights else "fp16")
    size = None if d.sparse or req.max_size_kb is None else int(req.max_size_kb * 1024)
    gm = mp_calibrated(d, ctx)
    res = mp.search(gm, replace(ctx.config, w_bits=d.w_bits), ctx.holdout[0], mp.top1_metric(ctx.holdout[1]),
                    Budget(max_drop=max(budget, 0.0), max_size_bytes=size), input_shape=ctx.info.input_shape,
                    high=high, progress=True)
    d.plan = MixedPlan(tuple(d.plan.rules if d.plan else ()) + tuple(res.chosen.plan.rules))
    d.notes.append(f"G4: W{d.w_bits}A8 with {len(res.chosen.high_layers)} layer(s) raised to {high} by sensitivity "
                   f"({', '.join(res.chosen.high_layers) or 'none'}; budget left {budget:.2f} points"
                   + ("" if res.met else f"; the search's closest: {res.reason}") + ")")
    return d


def structural_drop(ctx: Context) -> float:
    """Held-out points the current structure lost before quantization (0 before any structural step)."""
    return max(0.0, (ctx.fp32_holdout - ctx.float_holdout) * 100)


def mp_calibrated(d: Deployable, ctx: Context):
    config = replace(ctx.config, w_bits=d.w_bits)
    gm = ptq.prepare(d.model, ctx.info.input_shape, config, d.plan)
    x = torch.from_numpy(ctx.calib)
    ptq.calibrate(gm, lambda: (x[i:i + 256] for i in range(0, len(x), 256)))
    return ptq.freeze(gm, config)


def step_g5(d: Deployable, ctx: Context, memory_binds: bool) -> str | None:
    from ..algorithms import pruning

    if memory_binds:  # magnitude pruning: memory (the TTA guideline G5)
        sparsity, how = ctx.options.sparsity, "given"
        if sparsity is None:  # just enough for the size budget, counted in the format the model will be deployed in
            bits = lowest_bits(ctx)
            sparsity = auto_sparsity(d.model, 0.97 * ctx.requirement.max_size_kb * 1024, bits)
            how = f"chosen to fit {ctx.requirement.max_size_kb:g} KiB with {bits}-bit values"
        pruning.magnitude_prune(d.model, sparsity)  # masks held by a parametrization while tuning
        _tune(d.model, ctx, "G5", "G5 fine-tuning (masked)")
        pruning.remove_masks(d.model)
        d.sparse = True
        d.notes.append(f"G5: {sparsity:.0%} of the weights pruned by magnitude ({how}; sparse storage)")
        return None
    model, record = pruning.prune_channels(d.model, ctx.info.input_shape, target_macs=ctx.options.prune_macs)
    _tune(model, ctx, "G5", "G5 fine-tuning")
    d.model = model
    d.notes.append(f"G5: channels pruned to {record.macs_after / record.macs_before:.0%} of the MACs")
    return None


# ----------------------------------------------------------------------------- the loop

def order_steps(steps: tuple[str, ...], memory_binds: bool) -> list[str]:
    """The guideline's order; G5 goes before G3 when memory is the binding constraint."""
    out = [s for s in STEPS if s in steps]
    if memory_binds and "G5" in out and "G3" in out:
        out.remove("G5")
        out.insert(out.index("G3"), "G5")
    return out


def lowest_bits(ctx: Context) -> int:
    """The stored weight width the quantization roads can reach on this target (32: no integer road allowed)."""
    if not ctx.target.int8 or "G3" not in ctx.options.steps:
        return 16 if "G4" in ctx.options.steps else 32
    return container_bits(min(LOW_BITS), ctx.target)


def unmet(row: dict, ctx: Context) -> list[str]:
    """What ``row`` misses, judged on the held-out images (the test set only reports)."""
    return ctx.requirement.failures({**row, "top1": row["holdout_top1"]}, ctx.fp32_holdout)


def road_skip(road: Road, d: Deployable, ctx: Context, tried: list[dict]) -> str | None:
    """Why ``road`` is not worth running on ``d``'s structure (None: run it); ``tried``: this structure's rows."""
    req, t = ctx.requirement, ctx.target
    if road.step not in ctx.options.steps:
        return f"not allowed by --steps ({road.step})"
    if road.fmt == "fp16" and t.int8 and "G3" in ctx.options.steps:
        return f"{t.name} runs integer kernels: an integer road is smaller and faster than FP16"
    if road.fmt != "fp16" and road.w_bits < 8 and not t.packed_weights:
        return (f"{t.name} stores weights in int8 containers (ONNX QDQ): W{road.w_bits} is no smaller than W8, only "
                "less accurate")
    if road.fmt == "mixed" and req.max_drop is None:
        return "no accuracy target: mixed precision only buys accuracy back with size"
    if req.max_drop is not None and structural_drop(ctx) > req.max_drop:
        return (f"the structure already lost {structural_drop(ctx):.2f} held-out points (> {req.max_drop:g}): "
                "no precision recovers them")
    pred = predicted_bytes(road if road.fmt != "mixed" else replace(road, fmt="int8"), d.model, t, d.sparse)
    if req.max_size_kb is not None and pred > req.max_size_kb * 1024:
        how = "packed" if t.packed_weights and road.w_bits < 8 else ("FP16" if road.fmt == "fp16" else "int8 containers")
        return f"stores {pred / 1024:.1f} KiB ({how}{', sparse' if d.sparse else ''}) > {req.max_size_kb:g} KiB"
    for r in tried:
        if r["format"] == "int8" and road.fmt in ("int8", "mixed") and any("latency" in f for f in unmet(r, ctx)):
            return f"runs the same int8 kernels as {r['road']}, which missed the latency target ({r['latency_ms']:.3f} ms)"
        if road.fmt == "int8" and r["w_bits"] > road.w_bits and any("accuracy" in f for f in unmet(r, ctx)):
            return f"{r['road']} already misses the accuracy target on held-out images; fewer bits lose more"
    return None


def try_roads(d: Deployable, ctx: Context, rows: list[dict], skipped: dict, after: str) -> Deployable | None:
    """Run the quantization roads on ``d``'s structure, cheapest first; the first that meets the target is returned
    (its row appended to ``rows`` with ``taken``); skipped roads go to ``skipped`` with their reason."""
    tried: list[dict] = []
    for road in quant_roads(ctx.target, ctx.options.lowbit_method):
        key = f"{road.step} {road.label}" + ("" if after == "baseline" else f" after {after}")
        why = road_skip(road, d, ctx, tried)
        t0 = time.perf_counter()
        if why is not None:
            skipped[key] = why
            continue
        cand = road_deployable(road, d, ctx)
        label = replace(road, method=cand.method).label  # a pruned model gets round-to-nearest
        row = {**measure(cand, ctx, road.step, time.perf_counter() - t0), "road": label, "on": after}
        row["why"] = unmet(row, ctx) or ["meets the target"]
        rows.append(row)
        tried.append(row)
        if not unmet(row, ctx):
            row["taken"] = True
            return cand
    return None


def run_plan(model: nn.Module, info: ModelInfo, train_ds: ImageDataset, test_ds: ImageDataset, out: Path, *,
             target: Target, requirement: Requirement, options: PlanOptions = PlanOptions(),
             train_size: int | None = None, seed: int = 0, checkpoint_every: int | None = None,
             resume: bool = False) -> dict:
    """Plan by cost until ``requirement`` holds; write ``summary.json`` (``steps``, ``skipped``, ``met``) into ``out``.
    Fine-tuning checkpoints go to ``out/checkpoint_G<n>.pt`` every ``checkpoint_every`` steps (None: every five
    minutes of training); ``resume`` continues from them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, resume)
    from ..io.staging import new_stage

    stage = new_stage(out)  # .staging-<pid>-...: the next run sweeps it if this process is killed (SIGKILL)
    try:
        summary = _plan(model, info, train_ds, test_ds, stage, target, requirement, options, train_size, seed,
                        (out, checkpoint_every, resume))
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "summary.json"):
            if f.is_file() and (f.name in ("summary.json", "model_final.onnx") or f.suffix == ".json"):
                f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def check_resume(out: Path, resume: bool) -> None:
    """``resume`` needs the fine-tuning checkpoints of an earlier plan in ``out``; a new plan must not overwrite them."""
    found = sorted(p.name for p in out.glob("checkpoint_G*.pt"))
    if resume and not found:
        raise EdgeslimError(f"--resume: no fine-tuning checkpoint (checkpoint_G*.pt) in {out}: run without --resume first")
    if found and not resume:
        raise EdgeslimError(f"{out / found[0]} exists from an earlier run: add --resume to continue it, or pass a new --out")


def split_holdout(train: TrainData, size: int, seed: int) -> tuple[TrainData, tuple[torch.Tensor, np.ndarray]]:
    """Hold ``size`` training images out of fine-tuning (at most a quarter of them): every choice is scored there."""
    n = min(size, max(1, len(train.y) // 4))
    idx = np.random.default_rng(seed + 1).permutation(len(train.y))
    hold, keep = torch.from_numpy(np.sort(idx[:n])), torch.from_numpy(np.sort(idx[n:]))
    return TrainData(train.x[keep], train.y[keep], train.pad_value), (train.x[hold], train.y[hold].numpy())


def _plan(model, info, train_ds, test_ds, stage, target, requirement, options, train_size, seed, checkpoints) -> dict:
    t_start = time.perf_counter()
    train, holdout = split_holdout(load_train(train_ds, info, train_size, seed), options.holdout_size, seed)
    rng = np.random.default_rng(seed)
    cal_idx = rng.choice(len(train.y), min(options.calib_size, len(train.y)), replace=False)
    teacher = copy.deepcopy(model).eval()
    ctx = Context(info, teacher, train, test_ds, train.x[cal_idx].numpy(), holdout,
                  target.ptq_config(PTQConfig(calib_size=options.calib_size, seed=seed)), target, requirement, options,
                  stage, api.export_fp32_onnx(model, info.input_shape, stage / "baseline_fp32.onnx"),
                  options.budget_epochs)
    ctx.checkpoints, ctx.checkpoint_every, ctx.resume = checkpoints
    ctx.model_digest = params_digest(model)
    d = Deployable(copy.deepcopy(model).eval())
    rows = [{**measure(d, ctx, "baseline", 0.0), "road": "FP32", "on": "baseline"}]
    ctx.fp32_top1, ctx.fp32_holdout = rows[0]["top1"], rows[0]["holdout_top1"]
    ctx.float_holdout = ctx.fp32_holdout
    skipped = {s: "not allowed by --steps" for s in STEPS if s not in options.steps}
    done = try_roads(d, ctx, rows, skipped, "baseline") if unmet(rows[0], ctx) else d
    memory_binds = requirement.max_size_kb is not None and done is None and \
        predicted_bytes(Road("G3", "int8", lowest_bits(ctx)), model, target, False) > requirement.max_size_kb * 1024
    order = [s for s in order_steps(options.steps, memory_binds) if s in ("G1", "G2", "G5")]
    ctx.epochs_per_step = options.budget_epochs / max(1, len(runnable_steps(order, ctx, memory_binds)))
    for step in order:
        if done is not None:
            skipped[step] = f"not needed: {rows[-1]['road']} on the {rows[-1]['on']} structure meets the target"
            continue
        reason = structural_skip(step, ctx, memory_binds, order)
        d, reason = (d, reason) if reason else structural_step(step, d, ctx, memory_binds, rows)
        if reason is not None:
            skipped[step] = reason.removeprefix("skipped: ")
            continue
        done = None if unmet(rows[-1], ctx) else d
        if done is None:
            done = try_roads(d, ctx, rows, skipped, step)
    if done is None and rows[-1]["road"] == "FP32" and ctx.target.int8 and "G3" in options.steps:
        rows.append(closest_road(d, ctx, rows[-1]["on"]))
    return summarize(rows, skipped, ctx, done is not None, order, memory_binds, train, t_start)


def closest_road(d: Deployable, ctx: Context, on: str) -> dict:
    """When no road can meet the target on the final structure: measure the allowed integer road that stores the
    least anyway (the closest the target's format gets), so the summary can name it."""
    roads = [r for r in quant_roads(ctx.target, ctx.options.lowbit_method)
             if r.fmt == "int8" and (r.w_bits == 8 or ctx.target.packed_weights)]
    road = min(roads, key=lambda r: (predicted_bytes(r, d.model, ctx.target, d.sparse), -r.w_bits))
    t0 = time.perf_counter()
    cand = road_deployable(road, d, ctx)
    row = {**measure(cand, ctx, road.step, time.perf_counter() - t0), "road": replace(road, method=cand.method).label,
           "on": on}
    row["why"] = unmet(row, ctx) + ["measured as the closest: no road can meet the target"]
    return row


def runnable_steps(order: list[str], ctx: Context, memory_binds: bool) -> list[str]:
    """The structural steps that will change weights if they are needed: they share the fine-tuning budget."""
    return [s for s in order if (s != "G1" or ctx.options.backbone) and structural_skip(s, ctx, memory_binds, order)
            is None]


def structural_skip(step: str, ctx: Context, memory_binds: bool, order: list[str]) -> str | None:
    """G2 is not worth its accuracy when only memory binds and G5 may run: magnitude pruning alone reaches any size
    (its sparsity is chosen for the budget), and factorization buys MACs the target does not ask for."""
    if step == "G2" and memory_binds and "G5" in order and ctx.requirement.max_latency_ms is None:
        return ("only the size binds and G5's magnitude pruning reaches it alone; factorization would spend "
                "accuracy on MACs no target asks for")
    return None


def structural_step(step: str, d: Deployable, ctx: Context, memory_binds: bool, rows: list[dict]):
    """Run G1 / G2 / G5 on a copy of ``d``; measure the float result into ``rows``. Returns (new d, skip reason)."""
    t0 = time.perf_counter()
    new = copy.deepcopy(d)
    reason = step_g5(new, ctx, memory_binds) if step == "G5" else {"G1": step_g1, "G2": step_g2}[step](new, ctx)
    if reason is not None:
        return d, reason
    row = {**measure(new, ctx, step, time.perf_counter() - t0), "road": "FP32", "on": step}
    row["why"] = unmet(row, ctx) or ["meets the target"]
    rows.append(row)
    ctx.float_holdout = row["holdout_top1"]
    return new, None


def summarize(rows, skipped, ctx: Context, met: bool, order, memory_binds, train, t_start) -> dict:
    req, opts, stage = ctx.requirement, ctx.options, ctx.work
    best = next((r for r in rows if r.get("taken")), None) or closest(rows[1:] or rows, ctx)
    shutil.copy(stage / best["onnx"], stage / "model_final.onnx")
    return {"model": ctx.info.name, "target": ctx.target.to_dict(), "requirement": asdict(req),
            "options": opts.to_dict(),
            "size_counts": "packed k-bit weights" if ctx.target.packed_weights else "int8 containers (ONNX QDQ)",
            "order": order, "memory_binds": memory_binds, "steps": rows, "skipped": skipped, "met": met,
            "unmet": unmet(best, ctx), "best": {"step": best["step"], "road": best["road"], "unmet": unmet(best, ctx)},
            "statement": _statement(met, best, ctx), "fp32_top1": ctx.fp32_top1, "fp32_holdout_top1": ctx.fp32_holdout,
            "holdout_images": int(len(ctx.holdout[1])), "train_images": int(len(train.y)),
            "epochs_per_step": ctx.epochs_per_step,
            "total_seconds": time.perf_counter() - t_start}


def closest(rows: list[dict], ctx: Context) -> dict:
    """The candidate (the baseline excluded when others exist: it is the input, not a result) with the fewest unmet
    requirements, then the smallest sum of relative overshoots (held-out accuracy)."""
    return min(rows, key=lambda r: (len(unmet(r, ctx)),
                                    ctx.requirement.excess({**r, "top1": r["holdout_top1"]}, ctx.fp32_holdout)))


def _statement(met: bool, best: dict, ctx: Context) -> str:
    desc = (f"{best['road']} after {best['on']}: test top-1 {best['top1']:.4f} ({(best['top1'] - ctx.fp32_top1) * 100:+.2f} "
            f"points; held-out {(best['holdout_top1'] - ctx.fp32_holdout) * 100:+.2f}), {best['latency_ms']:.3f} ms, "
            f"{best['size_bytes'] / 1024:.1f} KiB")
    if met:
        return f"target met by {desc}"
    return f"target NOT met by any road. Closest: {desc}; fails: {'; '.join(unmet(best, ctx))}"
