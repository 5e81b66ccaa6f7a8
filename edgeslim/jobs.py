"""The ``quantize`` job end to end: quantize, measure, export, deploy, report into one output folder.

Everything is written to a staging folder first and moved into ``out`` at the end, ``summary.json``
last, so a failed run never leaves a partial summary behind.
"""

from __future__ import annotations

import json
import statistics
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import analysis, api
from .algorithms import ptq
from .analysis import AnalyzeOptions
from .config import MeasureOptions, MixedPlan, PTQConfig
from .data import ImageDataset, batches, calibration_indices
from .errors import EdgeslimError
from .eval import metrics, ort as ort_eval
from .eval.layer_error import layer_errors
from .export.onnx_qdq import save_onnx, set_metadata, weight_containers
from .models import ModelInfo
from .report.encodings import encodings
from .report.html import write_report
from .report.provenance import preprocessing


def run_quantize(model: nn.Module, info: ModelInfo, calib_ds: ImageDataset, test_ds: ImageDataset,
                 config: PTQConfig, out: Path, measure: MeasureOptions = MeasureOptions(),
                 analyze: AnalyzeOptions | None = None, plan: MixedPlan | None = None,
                 provenance: dict | None = None) -> dict:
    """Quantize ``model`` on ``calib_ds``, evaluate on ``test_ds``, write artifacts into ``out``; return the summary.

    With ``analyze`` the integer engine also runs (``edgeslim analyze``): engine accuracy, agreement
    with onnxruntime, overflow statistics. ``provenance`` (files, versions, CPU, command line) goes into the
    summary and the report as given.
    """
    if info.num_classes and len(test_ds.classes) > info.num_classes:
        raise EdgeslimError(f"test data has {len(test_ds.classes)} classes but the model predicts {info.num_classes}: "
                            "pass data for this model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .io.staging import new_stage

    stage = new_stage(out)  # .staging-<pid>-...: the next run sweeps it if this process is killed (SIGKILL)
    try:
        summary = _run(model, info, calib_ds, test_ds, config, stage, measure, analyze, plan, provenance)
        for f in sorted(stage.iterdir(), key=lambda p: p.name == "summary.json"):
            f.replace(out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _run(model, info, calib_ds, test_ds, config, stage: Path, measure: MeasureOptions,
         analyze: AnalyzeOptions | None, plan: MixedPlan | None, provenance: dict | None = None) -> dict:
    idx = calibration_indices(len(calib_ds), config.calib_size, config.seed, calib_ds.labels)
    calib = np.concatenate([x for x, _ in batches(calib_ds, 256, idx, desc="loading calibration images")])
    q = api.quantize(model, calib, config, plan=plan, input_shape=info.input_shape, progress=True)
    fp32_path = api.export_fp32_onnx(model, info.input_shape, stage / "model_fp32.onnx")
    int8_path = api.export_onnx(q, stage / "model_int8.onnx")
    pre = preprocessing(test_ds.preprocess, info.channel_order, getattr(test_ds, "name", ""))  # what the files expect
    for path in (fp32_path, int8_path):
        save_onnx(set_metadata(onnx.load(str(path)), {"edgeslim.model": info.name,
                                                      "edgeslim.preprocessing": json.dumps(pre)}), path)

    logits, sub = _evaluate(model, q, fp32_path, int8_path, test_ds, measure)
    y = test_ds.labels
    integer, total = ort_eval.integer_convs(int8_path)
    paths = {"fp32": fp32_path, "int8": int8_path}
    latency = {f"batch{b}": ort_eval.latency_samples(paths, info.input_shape, b, threads=measure.threads,
                                                      rounds=measure.latency_rounds) for b in measure.latency_batches}
    layers = layer_errors(q.model, torch.as_tensor(calib[: min(len(calib), 64)]))
    summary = {
        "model": info.name,
        "preprocessing": pre,
        "images": {"calibration": int(len(idx)), "test": int(len(y))},
        "chance_top1": 1.0 / max(1, len(test_ds.classes)),  # top-1 of a constant guess: reports flag scores near it
        "fp32": {"top1": metrics.top1(logits["onnx_fp32"], y), "scored_by": "onnxruntime (model_fp32.onnx), all images",
                 "pytorch_top1_on_subset": metrics.top1(logits["fp32"], y[sub])},
        "quantized": {"top1": metrics.top1(logits["fq"], y[sub]), "images": int(len(sub)),
                      "flips_vs_fp32": metrics.flips(logits["fq"], logits["fp32"])},
        "onnx_fp32": {"top1": metrics.top1(logits["onnx_fp32"], y)},
        "onnx_int8": {
            "top1": metrics.top1(logits["onnx_int8"], y),
            "flips_vs_fp32": metrics.flips(logits["onnx_int8"], logits["onnx_fp32"]),
            "flips_vs_quantized": metrics.flips(logits["onnx_int8"][sub], logits["fq"]),
            "integer_convs": integer,
            "total_convs": total,
            "optimized_ops": dict(sorted(ort_eval.optimized_op_counts(int8_path).items())),
            "float_ops_profile": ort_eval.float_ops_profile(int8_path, info.input_shape),
            "weight_containers": weight_containers(q.intgraph),
        },
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size,
                       "weights_fp32": 4 * sum(p.numel() for p in model.parameters()),
                       "weights_quantized": q.intgraph.weight_bytes()},
        "latency_ms": {
            "fp32": {k: statistics.median(v["fp32"]) for k, v in latency.items()},
            "int8": {k: statistics.median(v["int8"]) for k, v in latency.items()},
            "int8_over_fp32": {k: ort_eval.paired_ratio(v, "int8", "fp32") for k, v in latency.items()},
            "threads": measure.threads,
        },
        "time_to_quantize_s": q.seconds,
        "layers": layers,
        "config": config.to_dict(),
    }
    if plan is not None:
        summary["plan"] = plan.to_dict()
    if provenance is not None:
        summary["provenance"] = provenance
    if q.reports:  # AdaRound / BRECQ: per unit, error before / after on the calibration images, time
        summary["reconstruction"] = q.reports
    if analyze is not None:
        summary.update(analysis.analyze(q.intgraph, test_ds, logits["onnx_int8"], analyze, measure.batch_size))
    if {"tflite", "tflm"} & set(measure.formats):  # model_int8.tflite (+ TFLM C array, resolver, arena)
        from .export.tflm import write_deployment
        summary.update(write_deployment(q.intgraph, calib[:256], stage, measure.formats, test=batches(
            test_ds, measure.batch_size, desc="scoring model_int8.tflite (LiteRT)")))
    enc = encodings(q.intgraph)
    enc["preprocessing"] = pre
    (stage / "encodings.json").write_text(json.dumps(enc, indent=1))
    write_report(summary, stage / "report.html")
    (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _evaluate(model, q, fp32_path, int8_path, test_ds, measure: MeasureOptions) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Logits of the two ONNX files on every test image (onnxruntime, all cores, batched) and of the PyTorch FP32 and
    fake-quant models on a seeded class-balanced subset (returned as indices): the deployed files are what is
    scored; the simulation is checked against them where it is cheap to run."""
    sessions = {"onnx_fp32": ort_eval.session(fp32_path, threads=0), "onnx_int8": ort_eval.session(int8_path, threads=0)}
    n = len(test_ds)
    size = n if measure.simulation_images is None else min(n, measure.simulation_images)
    sub = calibration_indices(n, size, 0, test_ds.labels) if size < n else np.arange(n)
    outs: dict[str, list[np.ndarray]] = {k: [] for k in ("fp32", "fq", *sessions)}
    ptq.set_mode(q.model, "quant")
    for x, _ in batches(test_ds, measure.batch_size, desc="evaluating (onnxruntime)"):
        for k, s in sessions.items():
            outs[k].append(ort_eval.predict(s, x, measure.batch_size))
    with torch.no_grad():
        for x, _ in batches(test_ds, measure.batch_size, sub, desc="simulation subset (PyTorch)"):
            t = torch.from_numpy(x)
            outs["fp32"].append(model(t).numpy())
            outs["fq"].append(q.model(t).numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}, sub
