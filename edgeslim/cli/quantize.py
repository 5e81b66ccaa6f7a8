"""``edgeslim quantize``: post-training quantization of a model into an INT8 ONNX file, scored and reported, for
every task (classify, detect, fidelity); ``analyze`` runs the same with its analysis options."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import model_args, quant_args
from .common import load_model, mixed_plan, ptq_config, task_name
from .tasks import CLI_TASKS, build_task

__all__ = ["HELP", "add_arguments", "run", "quantize", "check_formats"]

HELP = "post-training quantization -> INT8 ONNX + report"


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    p.add_argument("--plan", help="mixed-precision plan JSON (per-layer precisions; written by `edgeslim mixed`)")
    p.add_argument("--formats", default="onnx", help="comma-separated: onnx (always written), tflite "
                   "(model_int8.tflite, LiteRT int8), tflm (also model_data.h/.cc, op resolver, arena size)")


def run(args) -> int:
    return quantize(args)


def check_formats(args, config) -> tuple[str, ...]:
    """``--formats`` (quantize): checked before any work, including the optional packages TFLite needs."""
    from ..export.tflm import check_config, parse_formats, require_tflite

    formats = parse_formats(getattr(args, "formats", "onnx"))
    require_tflite(formats)
    if formats != ("onnx",):
        check_config(config)
    return formats


def quantize(args, analysis=None) -> int:
    """Quantize, score and write ``--out`` for the task ``--task`` names; ``analysis``: ``analyze``'s function from
    the options to its ``AnalyzeOptions`` (engine, overflow), called once the model and the plan are loaded."""
    from ..jobs.quantize import run_quantize
    from ..report.provenance import provenance
    from ..report.results import QuantizeResult

    config = ptq_config(args)
    formats = check_formats(args, config)
    model, info = load_model(args)
    plan = mixed_plan(args, model, info)
    analyze = analysis(args) if analysis is not None else None
    task = task_name(args, info)
    if formats != ("onnx",):  # what TFLite cannot hold is refused here, before calibration
        from ..export.tflm import check_model, check_plan, require_litert

        check_plan(plan)
        check_model(model)
        if task != "classify":
            require_litert()
    if getattr(args, "decoded_output", False) and task != "detect":
        raise EdgeslimError("--decoded-output writes a detector's box decoding into the graph: it needs --task detect "
                            "and a detector edgeslim can decode")
    job, info = build_task(args, model, info, "quantize")
    summary = run_quantize(model, info, job, config, Path(args.out), plan=plan, analyze=analyze, formats=formats,
                           provenance=provenance(args, getattr(args, "argv", None)))
    CLI_TASKS[job.name].print_quantize(QuantizeResult.from_summary(summary), Path(args.out))
    return 0
