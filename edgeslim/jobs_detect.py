"""The ``sensitivity`` job for detectors (``--task detect``): every plan exported and scored with mAP in onnxruntime;
the shared parts are in ``detect_task``. (``quantize`` / ``analyze`` and ``mixed`` of a detector are the one
``jobs_quantize`` / ``jobs_mixed`` jobs with ``tasks.Detect``.) Artifacts are staged and moved into ``out`` at the
end, ``summary.json`` last.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from torch import nn

from . import api
from .algorithms import mixed_precision as mp, ptq
from .config import MixedPlan, PTQConfig
from .data.detection import DetectionDataset
from .detect_task import DetectOptions, calibrated, check_detector, evaluate_models, fit_options, ort_runner
from .eval import ort as ort_eval
from .export.onnx_qdq import save_onnx, to_onnx
from .io.staging import staged
from .lower import lower
from .models import ModelInfo
from .quant.precision import LayerPrecision


def run_detect_sensitivity(model: nn.Module, info: ModelInfo, calib: DetectionDataset, test: DetectionDataset,
                           config: PTQConfig, out: Path, *, groups: dict[str, tuple[str, ...]],
                           high: LayerPrecision, layers: bool = True, group_table: bool = True,
                           opts: DetectOptions = DetectOptions(), on_row=None) -> dict:
    """``on_row(row)`` sees each per-layer row as soon as it is scored.

    Jang et al.'s per-layer experiment (one layer at ``high``, the rest quantized) and Shin and Shin's Table 2 (every
    backbone / neck / head combination at ``high`` or quantized), each plan exported and scored in onnxruntime.

    Calibrates once; each plan is re-frozen from the stored statistics (``ptq.apply_plan``).
    """
    decoder = check_detector(info, test)
    opts = fit_options(model, opts)
    def work(stage: Path) -> dict:
        x_cal, gm = calibrated(model, info, calib, config, opts)
        mp.check_groups(gm, groups)
        fp32_path = api.export_fp32_onnx(model, info.input_shape, stage / "model_fp32.onnx")

        def scored(plan: MixedPlan | None, name: str) -> tuple[dict, Path]:
            ptq.apply_plan(gm, config, plan)
            path = save_onnx(to_onnx(lower(gm, info.input_shape)), stage / name)
            return evaluate_models({"m": ort_runner(path)}, test, decoder, opts, desc=name, info=info)["m"], path

        base = evaluate_models({"fp32": ort_runner(fp32_path)}, test, decoder, opts, desc="FP32", info=info)["fp32"]
        uniform, _ = scored(None, "uniform.onnx")
        summary: dict = {"model": info.name, "task": "detect", "config": config.to_dict(), "high": str(high),
                         "low": str(config.default_precision), "fp32": base, "uniform": uniform,
                         "images": {"calibration": int(len(x_cal)), "test": len(test), "imgsz": test.imgsz},
                         "detect_options": asdict(opts)}
        if layers:
            rows = []
            for name in ptq.layer_names(gm):
                r, _ = scored(mp.keep_high_plan(name, high), "layer.onnx")
                rows.append({"name": name, **{k: r[k] for k in ("map50", "map50_95", "precision", "recall", "f1")},
                             "delta_map50": r["map50"] - uniform["map50"],
                             "delta_map50_95": r["map50_95"] - uniform["map50_95"]})
                if on_row is not None:
                    on_row(rows[-1])
            summary["layers"] = rows
        if group_table:
            names, rows = list(groups), []
            for quantized in mp.group_combinations(names):
                precisions = {g: (config.default_precision if g in quantized else high) for g in names}
                r, path = scored(mp.group_plan(groups, precisions), f"groups_{len(rows)}.onnx")
                lat = ort_eval.latency_samples({"fp32": fp32_path, "m": path}, info.input_shape, 1,
                                               threads=opts.threads, rounds=opts.latency_rounds, warmup=3)
                ms = statistics.median(lat["m"])
                rows.append({"quantized": list(quantized), "precisions": {g: str(p) for g, p in precisions.items()},
                             **{k: r[k] for k in ("map50", "map50_95", "precision", "recall", "f1")},
                             "weight_bytes": lower(gm, info.input_shape).weight_bytes(), "onnx_bytes": path.stat().st_size,
                             "latency_ms": ms, "fps": 1e3 / ms, "latency_over_fp32": ort_eval.paired_ratio(lat, "m", "fp32")})
            summary["groups"] = {"groups": {g: list(p) for g, p in groups.items()}, "rows": rows,
                                 "fp32_bytes": int(4 * sum(p.numel() for p in model.parameters()))}
        for f in stage.glob("*.onnx"):
            f.unlink()
        return summary

    return staged(out, work)
