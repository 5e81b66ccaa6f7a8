"""``edgeslim mixed``: search per-layer precisions under a quality / size / latency budget, for every task
(``jobs.mixed.run_mixed``); ``--formats tflite`` via ``deploy``."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import FINAL_FORMATS_HELP, mixed_args, model_args, quant_args
from .common import high_precision, load_model, ptq_config, simulate_size, task_name
from .tasks import build_task
from .deploy import deploying
from .lines import fmt_score

__all__ = ["HELP", "add_arguments", "run", "budget", "print_mixed_summary"]

HELP = "search per-layer precisions under an accuracy / size / latency budget"


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    mixed_args(p, high_default=None)
    p.add_argument("--max-drop", type=float, help="quality budget in points below FP32: top-1 points for "
                   "classify (0.5 = half a point), mAP@0.5:0.95 points for detect")
    p.add_argument("--min-sqnr", type=float, help="fidelity (no labels): the worst output's SQNR vs FP32 must stay "
                   "at or above this many dB")
    p.add_argument("--max-size-kb", type=float, help="stored parameter budget in KiB")
    p.add_argument("--max-latency-ms", type=float, help="onnxruntime latency budget per image (batch 1)")
    p.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)


def budget(args, task: str):
    """``mixed``'s budget in the task's units, refusing the old fraction spelling of --max-drop."""
    from ..config import Budget

    if args.max_drop is not None and 0 < args.max_drop < 0.05:
        raise EdgeslimError(f"--max-drop {args.max_drop:g} is read as points (0.5 = half a point), so this allows "
                            f"{args.max_drop:g} points; it looks like the old fraction spelling: pass "
                            f"{args.max_drop * 100:g} for {args.max_drop * 100:g} points")
    if task == "fidelity" and args.max_drop is not None:
        raise EdgeslimError("without labels the plan is scored by its SQNR against the FP32 model, whose own SQNR is "
                            "infinite: give the floor with --min-sqnr DB (e.g. 30) instead of --max-drop")
    if task != "fidelity" and args.min_sqnr is not None:
        raise EdgeslimError(f"--min-sqnr is the label-free budget; the {task} task takes --max-drop (points)")
    return Budget(args.max_drop, None if args.max_size_kb is None else int(args.max_size_kb * 1024),
                  args.max_latency_ms, args.min_sqnr)


def _mixed(args) -> int:
    from ..config import MeasureOptions
    from ..jobs.mixed import run_mixed
    from ..report.results import MixedResult

    config = ptq_config(args)
    high = high_precision(args, config)
    model, info = load_model(args)
    kind = task_name(args, info)
    limits = budget(args, kind)
    measure = MeasureOptions(threads=args.threads, batch_size=args.batch_size,
                             simulation_images=simulate_size(args, 1000))
    task, info = build_task(args, model, info, "score")
    if kind == "detect":  # detector images are large: small batches, batch-1 latency, a small simulation subset
        measure = MeasureOptions(threads=args.threads, batch_size=task.opts.batch_size, latency_batches=(1,),
                                 simulation_images=simulate_size(args, 16))
    s = run_mixed(model, info, task, config, Path(args.out), budget=limits, high=high,
                  holdout_size=args.holdout_size, holdout_from=args.holdout_from, measure=measure,
                  score_with=args.score_with, on_step=_step_printer(task.metric_key))
    print_mixed_summary(MixedResult.from_summary(s), Path(args.out))
    return 0


run = deploying(_mixed)


def _step_printer(key: str):
    """Print each step of the mixed-precision search as soon as it is scored."""
    from tqdm import tqdm

    def show(c) -> None:
        tqdm.write(f"  {c.label[:34]:<36}{fmt_score(c.score, key):>10}{c.size_bytes / 1024:>9.1f} KiB"
                   f"  {'kept' if c.accepted else 'not kept'}")
    return show


def print_mixed_summary(s, out: Path) -> None:
    """FP32 / uniform / mixed rows (PyTorch and ONNX scores, size, latency), the budget on the held-out and the test
    inputs, and the layers kept high; ``s``: a ``MixedResult`` or its summary dict."""
    from ..report.mixed_html import metric_label
    from ..report.results import MixedResult

    r = MixedResult.of(s)
    m, key, images = r.mixed, r.metric["key"], r.images
    label = metric_label(r.metric)
    n_sim, n_test = images.get("simulation", images["test"]), images["test"]
    mixed_onnx = r.onnx_mixed["score"]
    print(f"\nONNX: the files in onnxruntime on {n_test} test inputs; PyTorch: the simulation on {n_sim} of them")
    print(f"\n{'':<22}{'PyTorch ' + label:>16}{'ONNX ' + label:>13}{'KiB':>9}{'ms b1':>9}")
    for name, row, onnx in (("FP32", r.fp32, r.fp32.onnx_score), ("uniform " + r.low, r.uniform, r.uniform.onnx_score),
                            ("mixed", m, mixed_onnx)):
        print(f"{name:<22}{fmt_score(row.score, key):>16}{fmt_score(onnx, key):>13}"
              f"{row.size_bytes / 1024:>9.1f}{row.batch1_ms:>9.3f}")
    print(f"{'met' if r.met else 'NOT met'} on the {images['holdout']} held-out inputs "
          f"(from --{'calib-data' if images['holdout_from'] == 'calib' else 'data'}): {r.reason}")
    b = r.budget
    if b["max_drop"] is not None or b["min_score"] is not None:
        per_unit, unit = r.metric["per_unit"], r.metric["unit"]
        fp32 = r.fp32.onnx_score
        have = (f"drop {(fp32 - mixed_onnx) * per_unit:.2f} {unit} (budget {b['max_drop']:.2f})"
                if b["max_drop"] is not None else f"{label} {fmt_score(mixed_onnx, key)} (floor {b['min_score']:.2f})")
        print(f"on the {n_test} test inputs (ONNX): {have}: " + ("within budget" if r.met_on_test else
              "OVER budget (the held-out inputs are few or unlike the test data: raise --holdout-size, or "
              "--holdout-from data when --calib-data is the training set)"))
    print(f"high precision ({r.high}): {', '.join(m.high_precision_layers) or 'none'} = "
          f"{m.high_precision_mac_fraction:.1%} of MACs")
    print(f"wrote {out}/summary.json, plan.json, model_mixed.onnx, report.html")
