"""``edgeslim plan``: the lightweighting guideline planned by cost (``jobs.plan.run_plan``): the cheapest road first
(quantization: W8, low-bit, mixed, FP16), then backbone swap, factorization and pruning, until the target's
requirement is met; ``--formats tflite`` via ``deploy``."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import FINAL_FORMATS_HELP, finetune_args
from .deploy import deploying
from .lighten import setup

__all__ = ["HELP", "add_arguments", "run", "check_backbone", "print_plan"]

HELP = ("cheapest road first: quantization (W8, low-bit, mixed, FP16), then backbone swap, "
        "factorization, pruning, until the target is met")


def add_arguments(p) -> None:
    finetune_args(p)
    p.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)
    p.add_argument("--max-ram-kb", type=float, help="mcu targets: RAM budget in KiB, the tensor arena TFLM allocates "
                   "for the int8 .tflite (needs the tflite extra)")
    p.add_argument("--target", default="cpu-int8", help="cpu-int8 (this CPU) | cpu-int8-vnni | cpu-int8-avx2 | vta | mcu-int8 | mcu-w4 | fp16-gpu | a target JSON")
    p.add_argument("--lowbit-method", default="brecq", help="learned rounding of the sub-8-bit roads: brecq | adaround")
    p.add_argument("--lowbit-iters", type=int, default=300, help="its iterations per unit")
    p.add_argument("--holdout-size", type=int, default=1000, help="training images kept out of fine-tuning that "
                   "score every choice (at most a quarter of them; the test set is never used to choose)")
    p.add_argument("--max-drop", type=float, help="accuracy budget in points of top-1 (1.0 = one point)")
    p.add_argument("--max-latency-ms", type=float, help="onnxruntime latency per image (batch 1)")
    p.add_argument("--max-size-kb", type=float, help="stored parameter size in KiB")
    p.add_argument("--steps", default="G1,G2,G3,G4,G5", help="which steps may run: G1 backbone swap, G2 factorization, "
                   "G3 uniform low-bit quantization, G4 mixed precision / FP16, G5 pruning")
    p.add_argument("--budget-epochs", type=float, default=3.0, help="fine-tuning epochs shared by factorization and pruning")
    p.add_argument("--calib-size", type=int, default=512, help="calibration images of the quantization roads")
    p.add_argument("--prune-macs", type=float, default=0.5, help="pruning (channel): keep this MACs fraction")
    p.add_argument("--sparsity", type=float, help="pruning (magnitude): sparsity (default: the smallest that "
                   "fits --max-size-kb, counted with the values' deployed width)")
    p.add_argument("--backbone", help="backbone swap: a light backbone as NAME[:WIDTH] (shufflenet_v2:0.5, mobilenet_v2:1.0); "
                   "it starts from random weights and is distilled from the model")


def check_backbone(spec: str | None) -> None:
    """``--backbone NAME[:WIDTH]``: a known light backbone and a width multiplier in (0, 4], checked before any work."""
    import math

    from ..algorithms.backbone import BACKBONES

    if spec is None:
        return
    name, _, width = spec.partition(":")
    if name.strip() not in BACKBONES:
        raise EdgeslimError(f"invalid --backbone {spec!r}: use NAME[:WIDTH] with NAME one of {', '.join(BACKBONES)}, "
                            "e.g. shufflenet_v2:0.5")
    try:
        w = float(width) if width else 1.0
    except ValueError:
        w = float("nan")
    if not (math.isfinite(w) and 0 < w <= 4):
        raise EdgeslimError(f"invalid --backbone {spec!r}: the width after ':' must be a multiplier in (0, 4], "
                            "e.g. shufflenet_v2:0.5")


def _plan(args) -> int:
    from ..config import PlanOptions, Requirement
    from ..jobs.plan import run_plan
    from ..targets import load_target

    check_backbone(args.backbone)
    cfg, model, info, train, test = setup(args)
    req = Requirement(args.max_drop, args.max_latency_ms, args.max_size_kb, args.max_ram_kb)
    opts = PlanOptions(steps=tuple(s.strip().upper() for s in args.steps.split(",") if s.strip()),
                       budget_epochs=args.budget_epochs, finetune=cfg, calib_size=args.calib_size,
                       prune_macs=args.prune_macs, sparsity=args.sparsity, threads=args.threads, backbone=args.backbone,
                       lowbit_method=args.lowbit_method, lowbit_iters=args.lowbit_iters,
                       holdout_size=args.holdout_size)
    s = run_plan(model, info, train, test, Path(args.out), target=load_target(args.target), requirement=req,
                 options=opts, train_size=args.train_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                 resume=args.resume)
    from ..report.results import PlanResult

    r = PlanResult.from_summary(s)
    print_plan(r)
    print(r.statement)
    print(f"wrote {args.out}/summary.json, model_final.onnx")
    return 0


run = deploying(_plan)


def print_plan(s) -> None:
    """Every measured candidate (structure, road, held-out / test top-1, latency, size, seconds, why), then every
    skipped step with its reason; ``s``: a ``PlanResult`` or its summary dict."""
    from ..report.results import PlanResult

    r = PlanResult.of(s)
    print(f"\n{'on':<9}{'road':<16}{'held-out':>9}{'test':>8}{'ms':>8}{'x FP32':>7}{'KiB':>8}{'s':>7}  why")
    for c in r.steps:
        print(f"{c.on:<9}{c.road:<16}{c.holdout_top1:>9.4f}{c.top1:>8.4f}{c.latency_ms:>8.3f}"
              f"{c.latency_vs_fp32:>7.2f}{c.size_bytes / 1024:>8.1f}{c.step_seconds:>7.0f}  "
              + ("TAKEN: " if c.taken else "") + "; ".join(c.why if c.has("why") else ["reference"]))
    print(f"(sizes: {r.size_counts})")
    for step, why in r.skipped.items():
        print(f"skipped {step}: {why}")
