"""``edgeslim factorize``: heavy convolutions replaced by depthwise-separable or bottleneck pairs initialized by SVD,
fine-tuned with distillation (``jobs.lighten.run_factorize``)."""

from __future__ import annotations

from pathlib import Path

from .args import finetune_args
from .lighten import print_pair, setup

__all__ = ["HELP", "add_arguments", "run"]

HELP = "factorization: heavy convs -> depthwise-separable or bottleneck, fine-tuned with distillation"


def add_arguments(p) -> None:
    finetune_args(p)
    p.add_argument("--method", default="separable", help="separable (depthwise + pointwise) | bottleneck (1x1 first)")
    p.add_argument("--layers", help="comma-separated conv names (default: the heaviest, by MACs share)")
    p.add_argument("--share", type=float, default=0.5, help="factorize the heaviest convs covering this MACs share")
    p.add_argument("--macs-reduction", type=float, default=0.5, help="each conv keeps at most this MACs fraction")
    p.add_argument("--rank", type=int, help="explicit rank / depth multiplier instead of --macs-reduction")


def run(args) -> int:
    from ..jobs.lighten import run_factorize

    cfg, model, info, train, test = setup(args)
    layers = [x.strip() for x in args.layers.split(",") if x.strip()] if args.layers else None
    s = run_factorize(model, info, train, test, Path(args.out), layers=layers, method=args.method,
                      macs_reduction=args.macs_reduction, rank=args.rank, share=args.share, finetune_cfg=cfg,
                      train_size=args.train_size, threads=args.threads, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    print_pair(s, "original", "factorized")
    print(f"before fine-tuning: top-1 {s['factorized']['top1_before_finetune']:.4f}")
    print(f"wrote {args.out}/summary.json, model_factorized.onnx, model_factorized.pt, factorize_record.json")
    return 0
