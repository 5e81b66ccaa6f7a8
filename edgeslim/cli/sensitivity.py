"""``edgeslim sensitivity``: per-layer sensitivity (each layer kept high, or quantized alone) and the layer-group
table, for every task (``jobs_mixed.run_sensitivity``; detectors: ``jobs_detect.run_detect_sensitivity``)."""

from __future__ import annotations

from pathlib import Path

from .args import mixed_args, model_args, quant_args
from .common import build_task, detect_data, high_precision, load_model, ptq_config, task_name
from .lines import fmt_score

__all__ = ["HELP", "add_arguments", "run", "print_sensitivity", "print_detect_sensitivity"]

HELP = ("per-layer sensitivity (each layer kept high / quantized alone) and the layer-group "
        "table (e.g. backbone / neck / head at each precision)")


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    mixed_args(p, high_default="fp32")
    p.add_argument("--group", action="append", default=[], metavar="NAME=PATTERN[|PATTERN]",
                   help="a named group of layers by module-name pattern (repeat); default: top-level modules")
    p.add_argument("--no-groups", action="store_true", help="skip the group table")


def run(args) -> int:
    from ..algorithms.mixed_precision import parse_group
    from ..config import MeasureOptions
    from ..jobs_mixed import run_sensitivity

    config = ptq_config(args)
    high = high_precision(args, config)
    groups = dict(parse_group(g) for g in args.group) or None
    model, info = load_model(args)
    if task_name(args, info) == "detect":
        return _detect_sensitivity(args, model, info, config, high, groups)
    task, info = build_task(args, model, info, "score")
    s = run_sensitivity(model, info, task, config, Path(args.out), high=high, holdout_size=args.holdout_size,
                        groups=groups, group_table=not args.no_groups, holdout_from=args.holdout_from,
                        measure=MeasureOptions(threads=args.threads, batch_size=args.batch_size),
                        score_with=args.score_with, on_row=_row_printer(task.metric_key))
    print_sensitivity(s, task.metric_key, args.out)
    return 0


def _row_printer(key: str):
    """Print each sensitivity row as soon as it is scored (above the progress bars)."""
    from tqdm import tqdm

    def show(sweep: str, row: dict) -> None:
        r = row[sweep]
        delta = "-" if r["delta"] is None else (f"{r['delta']:+.2f}" if key == "sqnr_db" else f"{r['delta']:+.4f}")
        what = "kept high" if sweep == "keep_high" else "only quantized"
        tqdm.write(f"  {row['name']:<28}{what:<16}{fmt_score(r['score'], key):>10}{delta:>9}")
    return show


def print_sensitivity(s: dict, key: str, out) -> None:
    """The FP32 / uniform line, one row per layer (kept high, only quantized), then the group table."""
    from ..report.mixed_html import metric_label

    sens = s["sensitivity"]
    label = metric_label(sens["metric"])
    print(f"\n{label}: FP32 {fmt_score(sens['fp32_score'], key)}, uniform {sens['low']} "
          f"{fmt_score(sens['uniform']['score'], key)} on {sens['images']} held-out inputs; sweeps took "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sens["seconds"].items()))
    print(f"{'op':<24}{'keep ' + str(sens['high']):>16}{'gain':>8}{'only ' + str(sens['low']):>16}{'change':>8}")
    for r in sens["rows"]:
        kh, oq = r.get("keep_high"), r.get("only_quantized")
        delta = (lambda d: "-" if d is None else f"{d:+.4f}" if key != "sqnr_db" else f"{d:+.2f}")
        print(f"{r['name']:<24}{fmt_score(kh['score'], key):>16}{delta(kh['delta']):>8}"
              f"{fmt_score(oq['score'], key):>16}{delta(oq['delta']):>8}")
    if "groups" in s:
        g = s["groups"]
        print(f"\ngroups ({', '.join(g['groups'])}) at {g['high']} / {g['low']}: {len(g['rows'])} combinations")
        for r in g["rows"]:
            prec = ",".join(r["precision"][n] for n in g["groups"])
            print(f"  {prec:<40} {label} {fmt_score(r['score'], key)}  {r['weight_bytes'] / 1024:8.1f} KiB  "
                  f"{r['latency_ms']:.3f} ms ({r['latency_over_fp32']:.2f}x FP32)")
    print(f"wrote {out}/summary.json, report.html")


def _detect_row_printer():
    from tqdm import tqdm

    def show(r: dict) -> None:
        tqdm.write(f"  {r['name']:<32} kept high: mAP@.5 {r['map50']:.4f} ({r['delta_map50']:+.4f}), "
                   f"@.5:.95 {r['map50_95']:.4f} ({r['delta_map50_95']:+.4f})")
    return show


def _detect_sensitivity(args, model, info, config, high, groups) -> int:
    from ..detect_task import DetectOptions
    from ..jobs_detect import run_detect_sensitivity
    from ..models import model_groups

    calib, test, info = detect_data(args, info)
    opts = DetectOptions(conf_thres=args.conf_thres, iou_thres=args.iou_thres, cm_conf=args.cm_conf,
                         batch_size=min(args.batch_size, 16), threads=args.threads)
    s = run_detect_sensitivity(model, info, calib, test, config, Path(args.out),
                               groups=groups or model_groups(model, info), high=high,
                               group_table=not args.no_groups, opts=opts, on_row=_detect_row_printer())
    print_detect_sensitivity(s, args.out)
    return 0


def print_detect_sensitivity(s: dict, out) -> None:
    """FP32 / uniform mAP, one row per layer kept high, then the group combinations."""
    print(f"\nFP32 mAP@.5 {s['fp32']['map50']:.4f} (@.5:.95 {s['fp32']['map50_95']:.4f}); all {s['low']} "
          f"{s['uniform']['map50']:.4f} ({s['uniform']['map50_95']:.4f}) on {s['images']['test']} images")
    print(f"{'layer kept ' + s['high']:<34}{'mAP@.5':>8}{'gain':>8}{'mAP@.5:.95':>12}{'gain':>8}")
    for r in s.get("layers", []):
        print(f"{r['name']:<34}{r['map50']:>8.4f}{r['delta_map50']:>+8.4f}{r['map50_95']:>12.4f}{r['delta_map50_95']:>+8.4f}")
    for r in s.get("groups", {}).get("rows", []):
        prec = ",".join(f"{g}={p}" for g, p in r["precisions"].items())
        print(f"  {prec:<48} mAP@.5 {r['map50']:.4f}  {r['weight_bytes'] / 1024:8.1f} KiB  {r['latency_ms']:.1f} ms "
              f"({r['latency_over_fp32']:.2f}x FP32)")
    print(f"wrote {out}/summary.json")
