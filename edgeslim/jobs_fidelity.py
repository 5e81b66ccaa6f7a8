"""The ``quantize`` job for the label-free ``fidelity`` task: any model, any outputs, no labels.

Calibrates on model inputs (``data.inputs``), exports FP32 and INT8 ONNX with the same input / output names
and the preprocessing in their metadata, and scores the INT8 model by how closely each of its outputs follows
the FP32 model's (``eval.fidelity``), both run in onnxruntime. The PyTorch simulation is checked against the
deployed file on a small subset (agreement in output LSBs). Everything is written atomically
(``io.staging``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import analysis, api
from .algorithms import ptq
from .config import MixedPlan, PTQConfig
from .data.inputs import InputSpec
from .errors import EdgeslimError
from .eval import ort as ort_eval
from .eval.fidelity import fidelity, headline_db
from .export.onnx_qdq import save_onnx, set_io_names, set_metadata, to_onnx, weight_containers
from .intgraph import IntGraph
from .io.staging import staged
from .models import ModelInfo
from .report.encodings import encodings
from .report.fidelity_html import write_fidelity_report

__all__ = ["FidelityOptions", "run_fidelity_quantize"]

SIMULATION_SUBSET = 32


@dataclass(frozen=True)
class FidelityOptions:
    threads: int = 1  # onnxruntime threads for latency
    batch_size: int = 64
    latency_rounds: int = 50
    weight_type: str = "auto"


def run_fidelity_quantize(model: nn.Module, info: ModelInfo, calib: np.ndarray, test: np.ndarray,
                          config: PTQConfig, out: Path, *, spec: InputSpec | None = None,
                          opts: FidelityOptions = FidelityOptions(), plan: MixedPlan | None = None,
                          analyze: analysis.AnalyzeOptions | None = None, formats: tuple[str, ...] = ("onnx",),
                          provenance: dict | None = None) -> dict:
    """Quantize ``model`` on ``calib`` (model inputs), score INT8 vs FP32 on ``test``; artifacts into ``out``.
    With ``analyze`` the integer engine also runs (``edgeslim analyze``): its agreement with onnxruntime per
    output and overflow statistics. ``formats`` with ``tflite`` / ``tflm`` also writes ``model_int8.tflite``
    (and the TFLM files), scored in LiteRT against the FP32 ONNX outputs like the INT8 ONNX file."""
    def work(stage: Path) -> dict:
        summary = _run(model, info, calib, test, config, stage, spec, opts, plan, analyze, formats)
        if provenance is not None:
            summary["provenance"] = provenance
        write_fidelity_report(summary, stage / "report.html")  # the summary's provenance and preprocessing included
        return summary

    return staged(out, work)


def _metadata(info: ModelInfo, spec: InputSpec | None, config: PTQConfig) -> dict[str, str]:
    values = {"edgeslim.model": info.name, "edgeslim.input_shape": json.dumps(list(info.input_shape)),
              "edgeslim.quantization": json.dumps({"w_bits": config.w_bits, "a_bits": config.a_bits})}
    if spec is not None:
        values["edgeslim.preprocessing"] = json.dumps(spec.to_dict())
    return values


def _fp32_file(model: nn.Module, info: ModelInfo, path: Path, names: tuple[list[str], list[str]],
               metadata: dict[str, str]) -> Path:
    """The FP32 model as ONNX: the user's own file when the model came from one, else torch's export."""
    src = (getattr(model, "meta", {}) or {}).get("onnx_path")
    proto = onnx.load(src) if src else onnx.load(str(api.export_fp32_onnx(model, info.input_shape, path)))
    if not src:
        set_io_names(proto, *names)
    return save_onnx(set_metadata(proto, metadata), path)


def output_lsbs(g: IntGraph) -> dict[str, float | None]:
    """The quantization step of each model output that is dequantized from integer codes (else None)."""
    return analysis.output_steps(g)


def _simulate(q: api.Quantized, x: np.ndarray, batch: int) -> list[np.ndarray]:
    ptq.set_mode(q.model, "quant")
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            y = q.model(torch.from_numpy(x[i:i + batch]))
            ys = list(y) if isinstance(y, (tuple, list)) else [y]
            for k, t in enumerate(ys):
                if len(outs) <= k:
                    outs.append([])
                outs[k].append(t.numpy())
    return [np.concatenate(o) for o in outs]


def _run(model, info: ModelInfo, calib: np.ndarray, test: np.ndarray, config: PTQConfig, stage: Path,
         spec: InputSpec | None, opts: FidelityOptions, plan: MixedPlan | None,
         analyze: analysis.AnalyzeOptions | None, formats: tuple[str, ...] = ("onnx",)) -> dict:
    q = api.quantize(model, calib, config, plan=plan, input_shape=info.input_shape, progress=True)
    lite = None
    if {"tflite", "tflm"} & set(formats):  # refused here, before scoring, when TFLite cannot hold the graph
        from .export.tflm import build

        lite = build(q.intgraph, calib[:256])
    fixed_batch = (getattr(model, "meta", {}) or {}).get("onnx_dynamic_batch") is False
    batch = 1 if fixed_batch else opts.batch_size
    names = api.fp32_io_names(q.model, len(q.intgraph.output_names))
    metadata = _metadata(info, spec, config)
    fp32_path = _fp32_file(model, info, stage / "model_fp32.onnx", names, metadata)
    proto = to_onnx(q.intgraph, weight_type=opts.weight_type)
    lsbs = dict(zip(names[1], output_lsbs(q.intgraph).values()))
    int8_path = save_onnx(set_metadata(set_io_names(proto, *names), metadata), stage / "model_int8.onnx")

    sessions = {k: ort_eval.session(p, threads=0) for k, p in (("fp32", fp32_path), ("int8", int8_path))}
    outs = {k: ort_eval.predict_all(s, test, batch) for k, s in sessions.items()}
    if list(outs["fp32"]) != list(outs["int8"]):
        raise EdgeslimError(f"internal: INT8 outputs {list(outs['int8'])} differ from FP32 {list(outs['fp32'])}")
    per_output = fidelity(outs["fp32"], outs["int8"], lsbs)
    sub = test[:SIMULATION_SUBSET]
    sim = dict(zip(outs["int8"], _simulate(q, sub, batch)))
    agreement = {}
    for name, y in sim.items():
        diff = float(np.abs(y - outs["int8"][name][:len(sub)]).max()) if y.size else 0.0
        agreement[name] = {"max_abs_diff": diff, **({"max_diff_lsb": diff / lsbs[name]} if lsbs.get(name) else {})}

    integer, total = ort_eval.integer_convs(int8_path)
    islands = q.intgraph.float_islands()
    summary = {
        "task": "fidelity",
        "model": info.name,
        "inputs": {"calibration": int(len(calib)), "test": int(len(test)), "fixed_batch": fixed_batch,
                   "names": names[0], "shape": list(info.input_shape)},
        "preprocessing": spec.to_dict() if spec is not None else "inputs given as preprocessed arrays",
        "outputs": names[1],
        "headline": {"metric": "worst output SQNR of INT8 vs FP32 (dB)", "value": headline_db(per_output)},
        "onnx_int8": {
            "fidelity_vs_fp32": per_output,
            "integer_convs": integer,
            "total_convs": total,
            "float_islands": islands,
            "optimized_ops": dict(sorted(ort_eval.optimized_op_counts(int8_path).items())),
            "float_ops_profile": ort_eval.float_ops_profile(int8_path, info.input_shape),
            "weight_containers": weight_containers(q.intgraph, opts.weight_type),
        },
        "simulation_vs_onnx_int8": {"images": int(len(sub)), "per_output": agreement},
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size,
                       "weights_quantized": q.intgraph.weight_bytes()},
        "latency_ms": ort_eval.fp32_int8_latency(fp32_path, int8_path, info.input_shape, threads=opts.threads,
                                                 rounds=opts.latency_rounds),
        "time_to_quantize_s": q.seconds,
        "config": config.to_dict(),
    }
    if plan is not None:
        summary["plan"] = plan.to_dict()
    if analyze is not None:
        summary.update(analysis.analyze_outputs(q.intgraph, test, outs["int8"], outs["fp32"], analyze, batch))
    if lite is not None:
        summary.update(_tflite_fields(lite, stage, formats, test, outs["fp32"], names[1]))
    enc = encodings(q.intgraph)
    enc["preprocessing"] = summary["preprocessing"]
    (stage / "encodings.json").write_text(json.dumps(enc, indent=1))
    return summary


def _tflite_fields(lite, stage: Path, formats: tuple[str, ...], test: np.ndarray, fp32: dict[str, np.ndarray],
                   names: list[str]) -> dict:
    """``model_int8.tflite`` (+ TFLM files) into ``stage``; its outputs in LiteRT (XNNPACK, 1 thread, batch 1)
    scored against the FP32 ONNX outputs; the engine's ``tflite`` mode vs LiteRT / TFLM on the first inputs."""
    from .export.tflm import agreement, litert_runner, write_files

    fb, tg, info = lite
    fields = write_files(fb, tg, info, stage, formats)
    lsbs = dict(zip(names, output_lsbs(tg).values()))
    got = dict(zip(names, litert_runner(fb)(test)))
    fields["tflite"].update(fidelity_vs_fp32=fidelity(fp32, got, lsbs), inputs=int(len(test)),
                            scored_by="LiteRT (XNNPACK, 1 thread), batch 1",
                            engine_vs_runtimes=agreement(tg, fb, test[:SIMULATION_SUBSET // 4], names))
    return fields
