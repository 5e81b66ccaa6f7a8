"""The ``sensitivity`` / ``mixed`` jobs for detectors (``--task detect``): every plan exported and scored with mAP in
onnxruntime; the shared parts are in ``detect_task``. (``quantize`` / ``analyze`` of a detector is the one
``jobs_quantize`` job with ``tasks.Detect``.) Artifacts are staged and moved into ``out`` at the end,
``summary.json`` last.
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
from .errors import EdgeslimError
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

    Seed 000's per-layer experiment (one layer at ``high``, the rest quantized) and seed 002's Table 2 (every
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


def run_detect_mixed(model: nn.Module, info: ModelInfo, calib: DetectionDataset, test: DetectionDataset,
                     config: PTQConfig, out: Path, *, budget: mp.Budget, high: LayerPrecision,
                     opts: DetectOptions = DetectOptions()) -> dict:
    """Per-layer precisions under a mAP@0.5:0.95 budget: rank layers by what keeping each one at ``high`` recovers
    (seed 000's sweep), then raise them in that order until the drop vs FP32 fits ``budget.max_drop`` (mAP points:
    1.0 = one point), without passing ``budget.max_size_bytes``. Every plan is exported and scored in onnxruntime on ``test``.
    Writes ``plan.json``, ``model_mixed.onnx`` and ``summary.json``.
    """
    if budget.max_latency_ms is not None:
        raise EdgeslimError("mixed --task detect takes --max-drop and --max-size-kb (no latency budget yet)")
    if budget.max_drop is None:
        raise EdgeslimError("mixed --task detect needs --max-drop (mAP@0.5:0.95 points, e.g. 1.0 = one point)")
    decoder = check_detector(info, test)
    opts = fit_options(model, opts)
    def work(stage: Path) -> dict:
        x_cal, gm = calibrated(model, info, calib, config, opts)
        fp32_path = api.export_fp32_onnx(model, info.input_shape, stage / "model_fp32.onnx")

        def scored(plan: MixedPlan | None, name: str = "candidate.onnx") -> tuple[dict, int]:
            ptq.apply_plan(gm, config, plan)
            g = lower(gm, info.input_shape)
            path = save_onnx(to_onnx(g), stage / name)
            return evaluate_models({"m": ort_runner(path)}, test, decoder, opts, desc=name, info=info)["m"], \
                g.weight_bytes()

        fp32 = evaluate_models({"fp32": ort_runner(fp32_path)}, test, decoder, opts, desc="FP32", info=info)["fp32"]
        target = fp32["map50_95"] - budget.max_drop / 100
        fits = (lambda size: budget.max_size_bytes is None or size <= budget.max_size_bytes)
        uniform, size = scored(None)
        steps = [{"high": [], "map50": uniform["map50"], "map50_95": uniform["map50_95"], "weight_bytes": size}]
        chosen, best = [], uniform
        if best["map50_95"] < target and fits(size):
            gains = []
            for name in ptq.layer_names(gm):
                r, _ = scored(mp.keep_high_plan(name, high))
                gains.append((r["map50_95"] - uniform["map50_95"], name))
            for gain, name in sorted(gains, reverse=True):
                plan = MixedPlan(tuple((n, high) for n in [*chosen, name]))
                r, size = scored(plan)
                if not fits(size):
                    break
                chosen.append(name)
                best = r
                steps.append({"high": list(chosen), "map50": r["map50"], "map50_95": r["map50_95"],
                              "weight_bytes": size, "sweep_gain": gain})
                if r["map50_95"] >= target:
                    break
        plan = MixedPlan(tuple((n, high) for n in chosen))
        final, size = scored(plan, "model_mixed.onnx")
        met = final["map50_95"] >= target and fits(size)
        summary = {"model": info.name, "task": "detect", "fp32": fp32, "uniform": uniform, "mixed": final,
                   "high": str(high), "low": str(config.default_precision), "high_precision_layers": chosen,
                   "weight_bytes": size, "steps": steps, "met": met, "scored_on": "data",
                   "budget": {"max_drop": budget.max_drop, "max_size_bytes": budget.max_size_bytes},
                   "reason": (f"mAP@0.5:0.95 {final['map50_95']:.4f} vs target {target:.4f} "
                              f"(FP32 {fp32['map50_95']:.4f} - {budget.max_drop:g} points) with {len(chosen)} layer(s) at "
                              f"{high}" + ("" if fits(size) else f"; size {size} B over {budget.max_size_bytes} B")),
                   "images": {"calibration": int(len(x_cal)), "test": len(test)}, "config": config.to_dict()}
        plan.save(stage / "plan.json")
        (stage / "candidate.onnx").unlink(missing_ok=True)
        (stage / "model_fp32.onnx").unlink(missing_ok=True)
        return summary

    return staged(out, work)
