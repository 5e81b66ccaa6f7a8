"""``edgeslim inspect``: layers, parameters, MACs and size per layer, and the names a mixed-precision plan can
match."""

from __future__ import annotations

from .args import model_args
from .common import load_model

__all__ = ["HELP", "add_arguments", "run"]

HELP = "layers, parameters, MACs and size per layer"


def add_arguments(p) -> None:
    model_args(p)


def run(args) -> int:
    from ..eval.profile import profile
    from ..graph.capture import capture

    model, info = load_model(args)
    rows = profile(capture(model, info.input_shape))
    print(f"{info.name}: input {info.input_shape}, {info.num_classes} classes")
    print(f"{'layer':<28}{'op':<14}{'output':<18}{'params':>10}{'MACs':>14}{'KiB fp32':>10}")
    for r in rows:
        print(f"{r.name:<28}{r.op:<14}{str(r.out_shape[1:]):<18}{r.params:>10,}{r.macs:>14,}{r.fp32_bytes / 1024:>10.1f}")
    params, macs = sum(r.params for r in rows), sum(r.macs for r in rows)
    print(f"{'total':<60}{params:>10,}{macs:>14,}{4 * params / 1024:>10.1f}")
    from ..algorithms import ptq
    from ..config import PTQConfig

    names = ptq.plan_names(ptq.prepare(model, info.input_shape, PTQConfig()))
    print("names a mixed-precision plan can match (weighted layers, then adds / concatenations / pooling):")
    print("  " + " ".join(names))
    return 0
