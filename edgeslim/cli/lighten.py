"""What the lightweighting commands (``prune``, ``factorize``, ``plan``) share: the fine-tuning config and the data
sets read from ``args.finetune_args``, and the before / after table.

The steps are those of the TTA technical report "A Guideline for Lightening Convolutional Neural Networks for
Embedded Systems" (section 6.1, G1-G5): backbone swap, factorization, low-bit quantization, mixed precision,
pruning. User-facing help names them in words; G1-G5 are for code readers."""

from __future__ import annotations

from ..errors import EdgeslimError
from .common import load_model

__all__ = ["setup", "print_pair"]


def setup(args):
    """``(FinetuneConfig, model, ModelInfo, training set, test set)`` with the model's own preprocessing."""
    from ..config import FinetuneConfig
    from ..data import Preprocess, open_dataset

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


def print_pair(s, a: str, b: str) -> None:
    """Top-1, MACs, parameters, size and latency of model ``a`` (before) and ``b`` (after), and their latency ratio;
    ``s``: a ``LightenResult`` or its summary dict."""
    from ..report.results import LightenResult

    res = LightenResult.of(s)
    print(f"\n{'':<14}{'top-1':>8}{'MACs':>14}{'params':>10}{'KiB':>9}{'ms':>9}")
    for k in (a, b):
        r = res.row(k)
        print(f"{k:<14}{r.top1:>8.4f}{r.macs:>14,}{r.params:>10,}{r.size_bytes / 1024:>9.1f}{r.latency_ms:>9.3f}")
    after = res.row(b)
    print(f"latency {b}/{a}: {after.latency_vs(a):.2f}x (batch 1, {after.threads} thread(s), same run)")
