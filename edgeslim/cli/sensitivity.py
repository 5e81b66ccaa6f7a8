"""``edgeslim sensitivity``: per-layer sensitivity (each layer kept high, or quantized alone) and the layer-group
table, for every task (``jobs.mixed.run_sensitivity``)."""

from __future__ import annotations

from pathlib import Path

from .args import mixed_args, model_args, quant_args
from .common import high_precision, load_model, ptq_config
from .tasks import build_task
from .lines import fmt_score

__all__ = ["HELP", "add_arguments", "run", "print_sensitivity"]

HELP = ("per-layer sensitivity (each layer kept high / quantized alone) and the layer-group "
        "table (e.g. backbone / neck / head at each precision)")


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    mixed_args(p, high_default="fp32")
    p.add_argument("--group", action="append", default=[], metavar="NAME=PATTERN[|PATTERN]",
                   help="a named group of layers by module-name pattern (repeat); default: top-level modules, "
                        "folded into 4 contiguous groups of about equal MACs where there are more than 6")
    p.add_argument("--no-groups", action="store_true", help="skip the group table")
    p.add_argument("--sweep", choices=("both", "keep_high", "only_quantized"), default="both",
                   help="which per-layer sweep: each layer kept high, each quantized alone, or both (default)")
    p.add_argument("--layers-only", action="store_true",
                   help="sweep the weighted layers only, not the other ops (adds, concatenations, activations); "
                        "for tasks scored on the test inputs (detect)")


def run(args) -> int:
    from ..algorithms.layer_groups import parse_group
    from ..config import MeasureOptions
    from ..jobs.mixed import run_sensitivity

    config = ptq_config(args)
    high = high_precision(args, config)
    groups = dict(parse_group(g) for g in args.group) or None
    model, info = load_model(args)
    task, info = build_task(args, model, info, "score")
    s = run_sensitivity(model, info, task, config, Path(args.out), high=high, holdout_size=args.holdout_size,
                        groups=groups, group_table=not args.no_groups, holdout_from=args.holdout_from,
                        measure=MeasureOptions(threads=args.threads, batch_size=args.batch_size),
                        score_with=args.score_with, on_row=_row_printer(task.metric_key),
                        sweeps=("keep_high", "only_quantized") if args.sweep == "both" else (args.sweep,),
                        layers_only=args.layers_only)
    print_sensitivity(s, task.metric_key, args.out)
    return 0


def _row_printer(key: str):
    """Print each sensitivity row as soon as it is scored (above the progress bars); rows scored on the test
    inputs also show the task's other fields (a detector's mAP@0.5)."""
    from tqdm import tqdm

    def show(sweep: str, row: dict) -> None:
        r = row[sweep]
        what = "kept high" if sweep == "keep_high" else "only quantized"
        tqdm.write(f"  {row['name']:<28}{what:<16}{fmt_score(r['score'], key):>10}{_delta(r['delta'], key):>9}"
                   + _extra(r, key))
    return show


def _delta(d, key: str) -> str:
    return "-" if d is None else (f"{d:+.2f}" if key == "sqnr_db" else f"{d:+.4f}")


def _extra(r: dict, key: str) -> str:
    """A detector's mAP@0.5 next to its mAP@0.5:0.95 (rows scored on the test inputs carry every score field)."""
    return f"  mAP@.5 {r['map50']:.4f} ({_delta(r.get('delta_map50'), key)})" if "map50" in r else ""


def print_sensitivity(s, key: str, out) -> None:
    """The FP32 / uniform line, one row per layer (kept high, only quantized), then the group table; ``s``: a
    ``SensitivityResult`` or its summary dict."""
    from ..report.mixed_html import metric_label
    from ..report.results import SensitivityResult

    r = SensitivityResult.of(s)
    sens = r.sensitivity
    label = metric_label(sens.metric)
    print(f"\n{label}: FP32 {fmt_score(sens.fp32_score, key)}, uniform {sens.low} "
          f"{fmt_score(sens.uniform['score'], key)} on {sens.images} {sens.inputs or 'held-out'} inputs; "
          "sweeps took "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sens.seconds.items()))
    print(f"{'op':<24}{'keep ' + str(sens.high):>16}{'gain':>8}{'only ' + str(sens.low):>16}{'change':>8}")
    for row in sens.rows:
        kh, oq = row.get("keep_high") or {}, row.get("only_quantized") or {}
        print(f"{row['name']:<24}{fmt_score(kh['score'], key) if kh else '-':>16}{_delta(kh.get('delta'), key):>8}"
              f"{fmt_score(oq['score'], key) if oq else '-':>16}{_delta(oq.get('delta'), key):>8}")
    g = r.groups
    if g is not None:
        print(f"\ngroups ({', '.join(g.groups)}) at {g.high} / {g.low}: {len(g.rows)} combinations")
        for row in g.rows:
            prec = ",".join(row["precision"][n] for n in g.groups)
            print(f"  {prec:<40} {label} {fmt_score(row['score'], key)}  {row['weight_bytes'] / 1024:8.1f} KiB  "
                  f"{row['latency_ms']:.3f} ms ({row['latency_over_fp32']:.2f}x FP32)")
