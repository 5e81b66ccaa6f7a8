"""``edgeslim analyze``: ``quantize``, then the integer engine's accuracy and parity with onnxruntime and the
accumulator overflow statistics (``edgeslim.analysis``)."""

from __future__ import annotations

from .args import model_args, quant_args
from .quantize import quantize

__all__ = ["HELP", "add_arguments", "run", "analyze_options"]

HELP = "quantize, then run the integer engine: accuracy, parity, overflow"


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    p.add_argument("--engine", action="store_true", help="integer engine accuracy and parity with onnxruntime")
    p.add_argument("--overflow", action="store_true", help="per-layer / per-filter overflow statistics")
    p.add_argument("--accumulator", type=int, default=32, help="accumulator bits: 32 (default) or 16")
    p.add_argument("--overflow-mode", default="saturate", help="16-bit accumulator: saturate | wrap")
    p.add_argument("--requant", default="float", help="float (onnxruntime) | fixed (m0*2^-n) | shift (pow2)")
    p.add_argument("--overflow-images", type=int, default=256, help="test images for overflow statistics")
    p.add_argument("--plan", help="mixed-precision plan JSON (float islands run in float32 in the engine)")


def analyze_options(args):
    """The ``AnalyzeOptions`` of the options: neither --engine nor --overflow means both."""
    from ..config import AnalyzeOptions

    both = not (args.engine or args.overflow)
    return AnalyzeOptions(engine=args.engine or both, overflow=args.overflow or both,
                          accumulator_bits=args.accumulator, overflow_mode=args.overflow_mode,
                          requant=args.requant, overflow_images=args.overflow_images)


def run(args) -> int:
    return quantize(args, analyze_options)
