"""``edgeslim plan``: seed 003's lightweighting guideline as a loop that stops when the target is met.

G1 lighter backbone -> G2 factorize heavy convolutions -> G3 post-training quantization -> G4 reduced / mixed
precision -> G5 pruning, each applied to the result of the previous ones; after every step the deployable model
(the ONNX file onnxruntime runs) is measured: test top-1, latency per image, stored size, initialization time.
The loop stops as soon as every target holds (seed 003, Table 1 is one row per cumulative step). Adaptations
from the report: pruning moves before PTQ when memory is the binding constraint (8-bit weights alone cannot
reach the size budget), G4 becomes a mixed-precision search when PTQ drops more accuracy than allowed, G5 prunes
weights by magnitude when memory binds (sparse storage) and channels otherwise (speed).

Every fine-tuning step checkpoints into ``out/checkpoint_G<n>.pt`` (``train.checkpoint``); with ``resume`` the
finished steps load their final weights and the interrupted one continues exactly where its checkpoint was written.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import api
from .algorithms import mixed_precision as mp, ptq
from .algorithms.finetune import FinetuneConfig, finetune
from .config import MixedPlan, PTQConfig
from .data import ImageDataset
from .errors import EdgeslimError
from .eval import ort as ort_eval
from .tasks import onnx_top1
from .models import ModelInfo
from .quant.precision import LayerPrecision
from .targets import Target
from .train.checkpoint import Checkpoint, params_digest
from .train.data import TrainData, load_train

STEPS = ("G1", "G2", "G3", "G4", "G5")
STEP_NAMES = {"G1": "lighter backbone", "G2": "factorize heavy convs", "G3": "post-training quantization",
              "G4": "reduced / mixed precision", "G5": "pruning"}


@dataclass(frozen=True)
class Requirement:
    """What the user needs: accuracy drop in points, latency per image (onnxruntime, batch 1), stored size."""

    max_drop: float | None = None  # points of top-1 (1.0 = one point)
    max_latency_ms: float | None = None
    max_size_kb: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is None and self.max_latency_ms is None and self.max_size_kb is None:
            raise EdgeslimError("give a target: --max-drop POINTS, --max-latency-ms MS and/or --max-size-kb KB")
        for name, v in asdict(self).items():
            if v is not None and not v >= 0:
                raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v}: use a non-negative number")

    def excess(self, row: dict, fp32_top1: float) -> float:
        """How far ``row`` is from the requirement: the sum of relative overshoots (0 when it holds)."""
        total = 0.0
        if self.max_drop is not None:
            total += max(0.0, (fp32_top1 - row["top1"]) * 100 - self.max_drop) / max(self.max_drop, 0.1)
        if self.max_latency_ms is not None:
            total += max(0.0, row["latency_ms"] / max(self.max_latency_ms, 1e-9) - 1)
        if self.max_size_kb is not None:
            total += max(0.0, row["size_bytes"] / max(self.max_size_kb * 1024, 1e-9) - 1)
        return total

    def failures(self, row: dict, fp32_top1: float) -> list[str]:
        out = []
        if self.max_drop is not None and (fp32_top1 - row["top1"]) * 100 > self.max_drop + 1e-9:
            out.append(f"accuracy drop {(fp32_top1 - row['top1']) * 100:.2f} > {self.max_drop} points")
        if self.max_latency_ms is not None and row["latency_ms"] > self.max_latency_ms:
            out.append(f"latency {row['latency_ms']:.3f} > {self.max_latency_ms} ms")
        if self.max_size_kb is not None and row["size_bytes"] > self.max_size_kb * 1024:
            out.append(f"size {row['size_bytes'] / 1024:.1f} > {self.max_size_kb} KiB")
        return out


@dataclass(frozen=True)
class PlanOptions:
    steps: tuple[str, ...] = STEPS
    budget_epochs: float = 3.0  # fine-tuning epochs shared by the steps that change weights
    finetune: FinetuneConfig = FinetuneConfig()
    calib_size: int = 512
    holdout_size: int = 1000  # training images that score mixed-precision candidates (G4)
    prune_macs: float = 0.5  # G5 channel pruning: keep this fraction of MACs
    sparsity: float | None = None  # G5 magnitude pruning: fraction of weights set to zero; None: what the size needs
    factor_share: float = 0.5  # G2: factorize the heaviest convs covering this share of conv MACs
    factor_reduction: float = 0.5  # G2: each factorized conv keeps at most this fraction of its MACs
    backbone: str | None = None  # G1: "shufflenet_v2:0.5" / "mobilenet_v2:1.0" (name:width); None skips G1
    threads: int = 1
    latency_rounds: int = 100

    def __post_init__(self) -> None:
        bad = [s for s in self.steps if s not in STEPS]
        if bad or not self.steps:
            raise EdgeslimError(f"invalid --steps {','.join(self.steps)}: use a comma list of {', '.join(STEPS)}")
        if self.budget_epochs < 0:
            raise EdgeslimError(f"invalid --budget-epochs {self.budget_epochs}: use 0 or more")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise EdgeslimError(f"invalid --sparsity {self.sparsity}: use a fraction between 0 and 1")


@dataclass
class Deployable:
    """The current result: a float model (its structure after G1 / G2 / G5) and how it is deployed."""

    model: nn.Module
    fmt: str = "fp32"  # fp32 | fp16 | int8 | mixed
    plan: MixedPlan | None = None
    sparse: bool = False  # magnitude-pruned: size counted in the sparse format
    notes: list[str] = field(default_factory=list)


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
    """The ONNX file of ``d`` and its stored parameter bytes."""
    shape = ctx.info.input_shape
    if d.fmt in ("int8", "mixed"):
        q = api.quantize(d.model, ctx.calib, ctx.config, plan=d.plan, input_shape=shape)
        path = api.export_onnx(q, ctx.path(d.fmt))
        size = q.intgraph.weight_bytes()
        if d.sparse:
            size = _sparse_bytes(d.model, 8, high=[n for n, _ in d.plan.rules] if d.plan else ())
        return path, size
    fp32 = api.export_fp32_onnx(d.model, shape, ctx.path("fp32"))
    if d.fmt == "fp16":
        path = api.export_fp16_onnx(fp32, ctx.path("fp16"))
        return path, (_sparse_bytes(d.model, 16) if d.sparse else 2 * _params(d.model))
    return fp32, (_sparse_bytes(d.model, 32) if d.sparse else 4 * _params(d.model))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sparse_bytes(model: nn.Module, value_bits: int, high=()) -> int:
    """Sparse storage bytes; the tensors of the layers named in ``high`` (a mixed plan's FP16 / FP32 layers)
    are counted with 16-bit values instead of ``value_bits``."""
    from .algorithms.pruning import sparse_size_bytes

    low = sparse_size_bytes(model, value_bits=value_bits).rows
    if not high:
        return int(sum(r.bytes for r in low))
    wide = sparse_size_bytes(model, value_bits=16).rows
    prefixes = tuple(n + "." for n in high)
    return int(sum((w if r.name.startswith(prefixes) else r).bytes for r, w in zip(low, wide)))


def auto_sparsity(model: nn.Module, budget_bytes: float, value_bits: int) -> float:
    """The smallest sparsity (0.05 steps, at most 0.95) whose sparse storage fits ``budget_bytes``."""
    from .algorithms import pruning

    for sp in np.arange(0.05, 0.951, 0.05):
        trial = copy.deepcopy(model)
        pruning.magnitude_prune(trial, float(sp))
        pruning.remove_masks(trial)
        if _sparse_bytes(trial, value_bits) <= budget_bytes:
            return round(float(sp), 2)
    return 0.95


def measure(d: Deployable, ctx: Context, step: str, seconds: float) -> dict:
    path, size = export(d, ctx)
    top1 = onnx_top1({"m": path}, ctx.test, 500, f"{step}: scoring")["m"]
    lat = ort_eval.latency_samples({"fp32": ctx.fp32_onnx, "m": path}, ctx.info.input_shape, 1,
                                   threads=ctx.options.threads, rounds=ctx.options.latency_rounds)
    inits = []
    for _ in range(3):
        t0 = time.perf_counter()
        ort_eval.session(path, threads=ctx.options.threads)
        inits.append(time.perf_counter() - t0)
    return {"step": step, "name": STEP_NAMES.get(step, step), "format": d.fmt, "top1": top1,
            "latency_ms": statistics.median(lat["m"]), "latency_vs_fp32": ort_eval.paired_ratio(lat, "m", "fp32"),
            "size_bytes": int(size), "onnx_bytes": path.stat().st_size, "init_s": statistics.median(inits),
            "params": _params(d.model), "step_seconds": seconds, "notes": list(d.notes)}


def step_checkpoint(ctx: Context, step: str) -> Checkpoint | None:
    """``checkpoint_<step>.pt`` of a fine-tuning step: its identity is the original model's weights, the step, the
    target, the requirement and the plan options that shape the model (not threads or latency rounds)."""
    if ctx.checkpoints is None:
        return None
    settings = {k: v for k, v in asdict(replace(ctx.options, finetune=None)).items()
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
    from .algorithms.backbone import swap_backbone

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
    from .algorithms.factorize import choose_layers, factorize

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


def step_g3(d: Deployable, ctx: Context) -> str | None:
    if not ctx.target.int8:
        return f"skipped: target {ctx.target.name} has no integer kernels"
    gm = ptq.prepare(d.model, ctx.info.input_shape, ctx.config)
    d.fmt, d.plan = "int8", ctx.target.plan(gm)
    if d.plan is not None:
        d.notes.append(f"G3: FP32 islands for ops {ctx.target.name} cannot run in integer: "
                       + ", ".join(n for n, _ in d.plan.rules))
    return None


def step_g4(d: Deployable, ctx: Context, last: dict, float_top1: float | None = None) -> str | None:
    """Mixed precision when quantization costs more than the budget allows, else whole-model FP16.

    ``float_top1``: the accuracy of the float model with the current structure (the row before G3); the part of
    the drop that earlier steps (pruning, factorization) caused is not something precision can recover, so the
    search gets the budget that is left after it.
    """
    drop = (ctx.fp32_top1 - last["top1"]) * 100
    req = ctx.requirement
    if d.fmt in ("int8", "mixed") and req.max_drop is not None and drop > req.max_drop:
        structural = (ctx.fp32_top1 - (float_top1 if float_top1 is not None else ctx.fp32_top1)) * 100
        if structural > 0 and structural >= req.max_drop:
            return (f"skipped: {structural:.2f} of the {drop:.2f} points were lost before quantization (by the "
                    f"structural steps), more than the {req.max_drop:g} allowed: higher precision cannot recover them")
        gm = mp_calibrated(d, ctx)
        budget = req.max_drop - structural  # points
        res = mp.search(gm, ctx.config, ctx.holdout[0], mp.top1_metric(ctx.holdout[1]), mp.Budget(max_drop=budget),
                        input_shape=ctx.info.input_shape, high=LayerPrecision.parse("fp16"), progress=True)
        rules = tuple(r for r in (d.plan.rules if d.plan else ())) + tuple(res.chosen.plan.rules)
        d.fmt, d.plan = "mixed", MixedPlan(rules)
        d.notes.append(f"G4: quantization dropped {drop - structural:.2f} points (budget left {budget:.2f}): "
                       f"{len(res.chosen.high_layers)} layer(s) raised to FP16 "
                       f"({', '.join(res.chosen.high_layers) or 'none'})")
        return None
    if d.fmt == "fp32":
        d.fmt = "fp16"
        d.notes.append("G4: whole model FP16" + ("" if ctx.target.fp16 else
                                                 f" (target {ctx.target.name} has no FP16 arithmetic: storage only)"))
        return None
    return f"skipped: the {d.fmt} model already meets the accuracy target" if d.fmt != "fp16" else "skipped: already FP16"


def mp_calibrated(d: Deployable, ctx: Context):
    gm = ptq.prepare(d.model, ctx.info.input_shape, ctx.config, d.plan)
    x = torch.from_numpy(ctx.calib)
    ptq.calibrate(gm, lambda: (x[i:i + 256] for i in range(0, len(x), 256)))
    return ptq.freeze(gm, ctx.config)


def step_g5(d: Deployable, ctx: Context, memory_binds: bool) -> str | None:
    from .algorithms import pruning

    if memory_binds:  # magnitude pruning: memory (seed 003 G5)
        sparsity, how = ctx.options.sparsity, "given"
        if sparsity is None:  # just enough for the size budget, counted in the format the model will be deployed in
            bits = 8 if ("G3" in ctx.options.steps and ctx.target.int8) or d.fmt in ("int8", "mixed") else 32
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


def run_plan(model: nn.Module, info: ModelInfo, train_ds: ImageDataset, test_ds: ImageDataset, out: Path, *,
             target: Target, requirement: Requirement, options: PlanOptions = PlanOptions(),
             train_size: int | None = None, seed: int = 0, checkpoint_every: int | None = None,
             resume: bool = False) -> dict:
    """Apply the guideline's steps until ``requirement`` holds; write ``summary.json`` (``steps``, ``met``) into ``out``.
    Fine-tuning checkpoints go to ``out/checkpoint_G<n>.pt`` every ``checkpoint_every`` steps (None: every five
    minutes of training); ``resume`` continues from them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_resume(out, resume)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
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


def _plan(model, info, train_ds, test_ds, stage, target, requirement, options, train_size, seed, checkpoints) -> dict:
    t_start = time.perf_counter()
    train = load_train(train_ds, info, train_size, seed)
    rng = np.random.default_rng(seed)
    cal_idx = rng.choice(len(train.y), min(options.calib_size, len(train.y)), replace=False)
    hold_idx = rng.choice(len(train.y), min(options.holdout_size, len(train.y)), replace=False)
    teacher = copy.deepcopy(model).eval()
    changing = [s for s in options.steps if s in ("G2", "G5") or (s == "G1" and options.backbone)]
    ctx = Context(info, teacher, train, test_ds, train.x[cal_idx].numpy(), (train.x[hold_idx], train.y[hold_idx].numpy()),
                  target.ptq_config(PTQConfig(calib_size=options.calib_size, seed=seed)), target, requirement, options,
                  stage, api.export_fp32_onnx(model, info.input_shape, stage / "baseline_fp32.onnx"),
                  options.budget_epochs / max(1, len(changing)))
    ctx.checkpoints, ctx.checkpoint_every, ctx.resume = checkpoints
    ctx.model_digest = params_digest(model)
    d = Deployable(copy.deepcopy(model).eval())
    rows = [measure(d, ctx, "baseline", 0.0)]
    ctx.fp32_top1 = rows[0]["top1"]
    fails = requirement.failures(rows[0], ctx.fp32_top1)
    memory_binds = requirement.max_size_kb is not None and rows[0]["size_bytes"] / 4 > requirement.max_size_kb * 1024
    order = order_steps(options.steps, memory_binds)
    skipped: dict[str, str] = {}
    for step in order:
        if not fails:
            break
        t0 = time.perf_counter()
        before = copy.deepcopy(d)
        fn: Callable = {"G1": step_g1, "G2": step_g2, "G3": step_g3, "G5": step_g5}.get(step)
        reason = step_g4(d, ctx, rows[-1], _float_top1(rows)) if step == "G4" else (
            fn(d, ctx, memory_binds) if step == "G5" else fn(d, ctx))
        if reason is not None:
            skipped[step] = reason
            d = before
            continue
        rows.append(measure(d, ctx, step, time.perf_counter() - t0))
        fails = requirement.failures(rows[-1], ctx.fp32_top1)
    met = not fails
    best = min(rows, key=lambda r: (len(requirement.failures(r, ctx.fp32_top1)), requirement.excess(r, ctx.fp32_top1)))
    final = max((p for p in stage.glob("*.onnx") if p.name[:2].isdigit()), key=lambda p: p.name)
    shutil.copy(final, stage / "model_final.onnx")
    return {"model": info.name, "target": target.to_dict(), "requirement": asdict(requirement),
            "options": {**asdict(replace(options, finetune=None)), "finetune": options.finetune.to_dict()},
            "order": order, "memory_binds": memory_binds, "steps": rows, "skipped": skipped, "met": met,
            "unmet": fails, "best": {"step": best["step"], "unmet": requirement.failures(best, ctx.fp32_top1)},
            "statement": _statement(met, rows, best, fails, ctx.fp32_top1, requirement),
            "fp32_top1": ctx.fp32_top1, "train_images": int(len(train.y)), "total_seconds": time.perf_counter() - t_start}


def _float_top1(rows: list[dict]) -> float | None:
    """Top-1 of the last float (FP32 / FP16) row: the model's structure before quantization."""
    return next((r["top1"] for r in reversed(rows) if r["format"] in ("fp32", "fp16")), None)


def _statement(met: bool, rows: list[dict], best: dict, fails: list[str], fp32: float, req: Requirement) -> str:
    last = rows[-1]
    desc = (f"top-1 {last['top1']:.4f} ({(last['top1'] - fp32) * 100:+.2f} points), {last['latency_ms']:.3f} ms, "
            f"{last['size_bytes'] / 1024:.1f} KiB")
    if met:
        return f"target met after {last['step']} ({', '.join(r['step'] for r in rows[1:])}): {desc}"
    return (f"target NOT met after every step: the final model has {desc} and fails: {'; '.join(fails)}. "
            f"Closest: after {best['step']} (top-1 {best['top1']:.4f}, {best['latency_ms']:.3f} ms, "
            f"{best['size_bytes'] / 1024:.1f} KiB; fails: {'; '.join(req.failures(best, fp32)) or 'nothing'})")
