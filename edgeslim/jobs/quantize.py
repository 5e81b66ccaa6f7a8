"""The ``quantize`` (and ``analyze``) job for every task: quantize, export, score, measure, report into one folder.

The task (``tasks``: classify, detect, fidelity) is a parameter: it gives the calibration inputs, what the files
expect (preprocessing, metadata), the FP32 reference file, the scores of the deployed files and the report; this
job does what is the same for all of them: ``api.quantize``, the ``.tflite`` build (refused before any scoring when
TFLite cannot hold the graph), the two ONNX files with the task's metadata (the INT8 file keeps the FP32 file's
input / output names), the INT8 graph's statistics in onnxruntime, sizes, latency, ``encodings.json`` and the
summary. Everything is staged and moved into ``out`` at the end, ``summary.json`` last (``io.staging``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
from torch import nn

from .. import api
from ..config import AnalyzeOptions, MixedPlan, PTQConfig
from ..eval import ort as ort_eval
from ..export.onnx_qdq import save_onnx, set_metadata, weight_containers
from ..io.staging import staged
from ..models import ModelInfo
from ..report.encodings import encodings
from ..tasks import Deployed, Task

__all__ = ["run_quantize", "conv_counts"]


def conv_counts(ops: Counter) -> tuple[int, int]:
    """(convolutions running as integer kernels, all convolutions) from onnxruntime's optimized op counts, as
    ``eval.ort.integer_convs`` counts them."""
    integer = sum(ops[o] for o in ort_eval.INTEGER_CONV_OPS)
    return integer, integer + sum(ops[o] for o in ort_eval.FLOAT_CONV_OPS)


def run_quantize(model: nn.Module, info: ModelInfo, task: Task, config: PTQConfig, out: Path, *,
                 plan: MixedPlan | None = None, analyze: AnalyzeOptions | None = None,
                 formats: tuple[str, ...] = ("onnx",), provenance: dict | None = None) -> dict:
    """Quantize ``model`` on the task's calibration inputs, score the deployed files with the task, write ``out``;
    return the summary. ``plan``: per-layer precisions; ``analyze``: also run the integer engine (``edgeslim
    analyze``); ``formats`` with ``tflite`` / ``tflm``: also ``model_int8.tflite`` (and the TFLM files), scored by
    the task in LiteRT; ``provenance`` (files, versions, CPU, command line) goes into the summary as given."""
    task.check(info)

    def work(stage: Path) -> dict:
        calib = task.calibration(config, info)
        q = api.quantize(model, calib, config, plan=plan, input_shape=info.input_shape,
                         batch_size=task.calib_batch_size, progress=True)
        lite = None
        if {"tflite", "tflm"} & set(formats):  # refused here, before scoring, when TFLite cannot hold the graph
            from ..export.tflm import build

            lite = build(q.intgraph, calib[:task.tflite_range_inputs])
        metadata = task.metadata(info, config)
        fp32_path = task.fp32_file(model, info, stage / "model_fp32.onnx")
        int8_path = api.export_onnx(q, stage / "model_int8.onnx")
        for path in (fp32_path, int8_path):
            save_onnx(set_metadata(onnx.load(str(path)), metadata), path)
        d = Deployed(q, fp32_path, int8_path, calib, stage, lite, formats)

        pre = task.preprocessing(info)
        summary = {"model": info.name, "task": task.name, "preprocessing": pre,
                   **task.evaluate(model, info, d, analyze)}
        ops = ort_eval.optimized_op_counts(int8_path)  # one optimized session for both figures
        integer, total = conv_counts(ops)
        summary.setdefault(task.graph_key, {}).update({
            "integer_convs": integer, "total_convs": total, "float_islands": q.intgraph.float_islands(),
            "optimized_ops": dict(sorted(ops.items())),
            "float_ops_profile": ort_eval.float_ops_profile(int8_path, info.input_shape),
            "weight_containers": weight_containers(q.intgraph)})
        summary.update({
            "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size,
                           "weights_fp32": 4 * sum(p.numel() for p in model.parameters()),
                           "weights_quantized": q.intgraph.weight_bytes()},
            "latency_ms": task.latency(d, info),
            "time_to_quantize_s": q.seconds,
            "config": config.to_dict()})
        if plan is not None:
            summary["plan"] = plan.to_dict()
        if q.reports:  # AdaRound / BRECQ: per unit, error before / after on the calibration inputs, time
            summary["reconstruction"] = q.reports
        if provenance is not None:
            summary["provenance"] = provenance
        enc = encodings(q.intgraph)
        enc["preprocessing"] = pre
        (stage / "encodings.json").write_text(json.dumps(enc, indent=1))
        task.write_report(summary, info, stage / "report.html")
        return summary

    return staged(out, work)
