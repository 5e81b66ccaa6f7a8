"""The lightweighting commands (seed 003's guideline): ``prune`` (G5), ``factorize`` (G2), ``plan`` (G1-G5).

User-facing help names the steps in words (pruning, factorization, backbone swap); G1-G5 are for code readers."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_model import THREADS_HELP, load_model, model_args
from .errors import EdgeslimError


def add_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--train-data", required=True, help="training images (fine-tuning): ImageFolder dir / zip, ...")
    p.add_argument("--train-split", help="split / top-level folder of --train-data")
    p.add_argument("--train-size", type=int, help="fine-tune on a seeded class-balanced subset of this many images")
    p.add_argument("--data", required=True, help="test data")
    p.add_argument("--data-split", help="split / top-level folder of --data")
    p.add_argument("--eval-size", type=int, help="score on a seeded class-balanced subset of this many --data images "
                   "(default: all)")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs (fractions allowed)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning peak learning rate (cosine)")
    p.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    p.add_argument("--no-kd", action="store_true", help="fine-tune on labels only (no distillation)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets and of fine-tuning")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write the fine-tuning checkpoint into --out every "
                   "N optimizer steps and at every epoch end (default: every 5 minutes of training; 0: epoch ends only)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out (refused if the "
                   "model, options or training data differ)")
    p.add_argument("--out", required=True, help="output folder")


def _setup(args):
    from .algorithms.finetune import FinetuneConfig
    from .data import Preprocess, open_dataset

    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, kd=not args.no_kd, seed=args.seed)
    if args.threads < 1:
        raise EdgeslimError(f"invalid --threads {args.threads}: use 1 or more")
    if args.train_size is not None and args.train_size < 1:
        raise EdgeslimError(f"invalid --train-size {args.train_size}: use a positive number of images")
    model, info = load_model(args)
    pre = Preprocess(info.input_shape, info.mean, info.std)
    test = open_dataset(args.data, pre, split=args.data_split)
    if args.eval_size:
        test = test.subset(args.eval_size, args.seed)
    return cfg, model, info, open_dataset(args.train_data, pre, split=args.train_split), test


def _print_pair(s: dict, a: str, b: str) -> None:
    print(f"\n{'':<14}{'top-1':>8}{'MACs':>14}{'params':>10}{'KiB':>9}{'ms':>9}")
    for k in (a, b):
        r = s[k]
        print(f"{k:<14}{r['top1']:>8.4f}{r['macs']:>14,}{r['params']:>10,}{r['size_bytes'] / 1024:>9.1f}"
              f"{r['latency_ms']:>9.3f}")
    print(f"latency {b}/{a}: {s[b]['latency_vs_' + a]:.2f}x (batch 1, {s[b]['threads']} thread(s), same run)")


def prune(args) -> int:
    from .jobs_lighten import run_prune

    cfg, model, info, train, test = _setup(args)
    if args.method not in ("channel", "magnitude"):
        raise EdgeslimError(f"invalid --method {args.method!r}: use channel or magnitude")
    target = args.target_macs if args.target_macs is not None or args.ratio is not None else 0.7
    s = run_prune(model, info, train, test, Path(args.out), method=args.method, target_macs=target if args.ratio is None
                  else None, ratio=args.ratio, sparsity=args.sparsity, scope=args.scope, importance=args.importance,
                  gradual=not args.one_shot, finetune_cfg=cfg, train_size=args.train_size, threads=args.threads,
                  checkpoint_every=args.checkpoint_every, resume=args.resume)
    _print_pair(s, "dense", "pruned")
    print(f"wrote {args.out}/summary.json, model_pruned.onnx, model_pruned.pt"
          + (", prune_record.json" if args.method == "channel" else ", model_sparse.npz"))
    return 0


def factorize(args) -> int:
    from .jobs_lighten import run_factorize

    cfg, model, info, train, test = _setup(args)
    layers = [x.strip() for x in args.layers.split(",") if x.strip()] if args.layers else None
    s = run_factorize(model, info, train, test, Path(args.out), layers=layers, method=args.method,
                      macs_reduction=args.macs_reduction, rank=args.rank, share=args.share, finetune_cfg=cfg,
                      train_size=args.train_size, threads=args.threads, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    _print_pair(s, "original", "factorized")
    print(f"before fine-tuning: top-1 {s['factorized']['top1_before_finetune']:.4f}")
    print(f"wrote {args.out}/summary.json, model_factorized.onnx, model_factorized.pt, factorize_record.json")
    return 0


def check_backbone(spec: str | None) -> None:
    """``--backbone NAME[:WIDTH]``: a known light backbone and a width multiplier in (0, 4], checked before any work."""
    import math

    from .algorithms.backbone import BACKBONES

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


def plan(args) -> int:
    from .jobs_plan import PlanOptions, Requirement, run_plan
    from .targets import load_target

    check_backbone(args.backbone)
    cfg, model, info, train, test = _setup(args)
    req = Requirement(args.max_drop, args.max_latency_ms, args.max_size_kb, getattr(args, "max_ram_kb", None))
    opts = PlanOptions(steps=tuple(s.strip().upper() for s in args.steps.split(",") if s.strip()),
                       budget_epochs=args.budget_epochs, finetune=cfg, calib_size=args.calib_size,
                       prune_macs=args.prune_macs, sparsity=args.sparsity, threads=args.threads, backbone=args.backbone,
                       lowbit_method=getattr(args, "lowbit_method", "brecq"),
                       lowbit_iters=getattr(args, "lowbit_iters", 300),
                       holdout_size=getattr(args, "holdout_size", 1000))
    s = run_plan(model, info, train, test, Path(args.out), target=load_target(args.target), requirement=req,
                 options=opts, train_size=args.train_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                 resume=args.resume)
    print_plan(s)
    print(s["statement"])
    print(f"wrote {args.out}/summary.json, model_final.onnx")
    return 0


def print_plan(s: dict) -> None:
    """Every measured candidate (structure, road, held-out / test top-1, latency, size, seconds, why), then every
    skipped step with its reason."""
    print(f"\n{'on':<9}{'road':<16}{'held-out':>9}{'test':>8}{'ms':>8}{'x FP32':>7}{'KiB':>8}{'s':>7}  why")
    for r in s["steps"]:
        print(f"{r['on']:<9}{r['road']:<16}{r['holdout_top1']:>9.4f}{r['top1']:>8.4f}{r['latency_ms']:>8.3f}"
              f"{r['latency_vs_fp32']:>7.2f}{r['size_bytes'] / 1024:>8.1f}{r['step_seconds']:>7.0f}  "
              + ("TAKEN: " if r.get("taken") else "") + "; ".join(r.get("why", ["reference"])))
    print(f"(sizes: {s['size_counts']})")
    for step, why in s["skipped"].items():
        print(f"skipped {step}: {why}")
