"""``edgeslim demo``: train a small CNN on scikit-learn digits and quantize it, offline (``edgeslim.demo``)."""

from __future__ import annotations

from pathlib import Path

from .args import threads_arg
from .tasks.classify import print_quantize

__all__ = ["HELP", "add_arguments", "run"]

HELP = "train a small CNN on scikit-learn digits and quantize it (offline)"


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (summary.json, report.html, the ONNX files)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the small CNN")
    threads_arg(p)


def run(args) -> int:
    from ..demo import run_demo

    summary = run_demo(Path(args.out), epochs=args.epochs, threads=args.threads)
    print_quantize(summary, Path(args.out))
    return 0
