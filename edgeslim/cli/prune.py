"""``edgeslim prune``: channel pruning (a physically smaller, faster model) or magnitude pruning (sparse weights,
less memory), fine-tuned with distillation (``jobs.lighten.run_prune``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import finetune_args
from .lighten import print_pair, setup

__all__ = ["HELP", "add_arguments", "run"]

HELP = "pruning: channel pruning (speed) or magnitude pruning (memory), fine-tuned with distillation"


def add_arguments(p) -> None:
    finetune_args(p)
    p.add_argument("--method", default="channel", help="channel (physically smaller model) | magnitude (sparse)")
    p.add_argument("--target-macs", type=float, help="channel: keep this fraction of the MACs (0.7 = remove 30%%)")
    p.add_argument("--ratio", type=float, help="channel: remove this fraction of every prunable group instead")
    p.add_argument("--importance", default="l1", help="channel: l1 | l2 | bn | taylor")
    p.add_argument("--sparsity", type=float, default=0.5, help="magnitude: fraction of weights set to zero")
    p.add_argument("--scope", default="global", help="magnitude: global | layer")
    p.add_argument("--one-shot", action="store_true", help="magnitude: prune at once instead of gradually")


def run(args) -> int:
    from ..jobs.lighten import run_prune

    cfg, model, info, train, test = setup(args)
    if args.method not in ("channel", "magnitude"):
        raise EdgeslimError(f"invalid --method {args.method!r}: use channel or magnitude")
    target = args.target_macs if args.target_macs is not None or args.ratio is not None else 0.7
    s = run_prune(model, info, train, test, Path(args.out), method=args.method, target_macs=target if args.ratio is None
                  else None, ratio=args.ratio, sparsity=args.sparsity, scope=args.scope, importance=args.importance,
                  gradual=not args.one_shot, finetune_cfg=cfg, train_size=args.train_size, threads=args.threads,
                  checkpoint_every=args.checkpoint_every, resume=args.resume)
    print_pair(s, "dense", "pruned")
    print(f"wrote {args.out}/summary.json, model_pruned.onnx, model_pruned.pt"
          + (", prune_record.json" if args.method == "channel" else ", model_sparse.npz"))
    return 0
