"""The ``quantize`` / ``analyze`` / ``sensitivity`` / ``mixed`` jobs for detectors (``--task detect``): mAP and
confusion matrices, every file scored in onnxruntime; the shared parts are in ``detect_task``. Artifacts are staged
and moved into ``out`` at the end, ``summary.json`` last.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from torch import nn

from . import api
from .algorithms import mixed_precision as mp, ptq
from .analysis import AnalyzeOptions, check_requant, overflow_summary
from .config import MixedPlan, PTQConfig
from .data.detection import DetectionDataset
from .detect_task import (DetectOptions, add_metadata, calibrated, calibration_images, check_detector,
                          decoded_files, detector_metadata, engine_runner, evaluate_models, fit_options, ort_runner,
                          paired_latency, to_model_order, torch_runner)
from .errors import EdgeslimError
from .eval import ort as ort_eval
from .export.onnx_qdq import save_onnx, to_onnx, weight_containers
from .io.staging import staged
from .lower import lower
from .models import ModelInfo
from .quant.precision import LayerPrecision
from .report.encodings import encodings


# calibration images whose raw head outputs set the int8 range of the .tflite's heads (the engine runs them: about
# 3 s per yolov5n image at 640 on one core)
TFLITE_RANGE_IMAGES = 32


def run_detect_quantize(model: nn.Module, info: ModelInfo, calib: DetectionDataset, test: DetectionDataset,
                        config: PTQConfig, out: Path, *, plan: MixedPlan | None = None,
                        opts: DetectOptions = DetectOptions(), analyze: AnalyzeOptions | None = None,
                        formats: tuple[str, ...] = ("onnx",), provenance: dict | None = None) -> dict:
    """Quantize a detector on ``calib``, score FP32 / simulation / ONNX FP32 / ONNX INT8 on ``test``, write ``out``.
    ``formats`` with ``tflite`` / ``tflm`` also writes ``model_int8.tflite`` (and the TFLM files), its mAP in LiteRT
    (XNNPACK, 1 thread, batch 1) with the same decoder next to onnx_int8's."""
    decoder = check_detector(info, test)
    opts = fit_options(model, opts)
    def work(stage: Path) -> dict:
        x_cal = calibration_images(calib, config.calib_size, config.seed, info)
        q = api.quantize(model, x_cal, config, plan=plan, input_shape=info.input_shape, batch_size=opts.batch_size,
                         progress=True)
        lite = None
        if {"tflite", "tflm"} & set(formats):  # refused here, before scoring, when TFLite cannot hold the graph
            from .export.tflm import build, litert_runner

            lite = build(q.intgraph, x_cal[:TFLITE_RANGE_IMAGES])
        fp32_path = api.export_fp32_onnx(model, info.input_shape, stage / "model_fp32.onnx")
        int8_path = api.export_onnx(q, stage / "model_int8.onnx")
        for path in (fp32_path, int8_path):
            add_metadata(path, detector_metadata(info))
        ptq.set_mode(q.model, "quant")
        runners = {"onnx_fp32": ort_runner(fp32_path), "onnx_int8": ort_runner(int8_path)}
        if lite is not None:
            runners["tflite_litert"] = litert_runner(lite[0])
        results = evaluate_models(runners, test, decoder, opts, info=info, detail=True)
        if opts.decoded_output:
            results["decoded_output"] = decoded_files(fp32_path, int8_path, test, decoder, opts, info)
        n_sim = len(test) if opts.simulation_images is None else min(len(test), opts.simulation_images)
        sim_set = test if n_sim == len(test) else test.subset(n_sim, 0)
        sim = evaluate_models({"fp32": torch_runner(model), "quantized": torch_runner(q.model),
                               "onnx_int8_on_subset": ort_runner(int8_path)}, sim_set, decoder, opts,
                              desc="simulation subset (PyTorch)", info=info)
        for key in ("fp32", "quantized"):
            sim[key]["images"] = n_sim
        results.update(fp32=sim["fp32"], quantized=sim["quantized"])
        if n_sim < len(test):
            results["onnx_int8_on_simulation_subset"] = sim["onnx_int8_on_subset"]
        integer, total = ort_eval.integer_convs(int8_path)
        summary = {
            "model": info.name, "task": "detect",
            "images": {"calibration": int(len(x_cal)), "test": len(test), "test_boxes": test.num_boxes(),
                       "imgsz": test.imgsz},
            **results,
            "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size,
                           "weights_fp32": 4 * sum(p.numel() for p in model.parameters()),
                           "weights_quantized": q.intgraph.weight_bytes()},
            "latency_ms": paired_latency(fp32_path, int8_path, info, opts),
            "onnx_int8_graph": {"integer_convs": integer, "total_convs": total,
                                "optimized_ops": dict(sorted(ort_eval.optimized_op_counts(int8_path).items())),
                                "float_ops_profile": ort_eval.float_ops_profile(int8_path, info.input_shape),
                                "weight_containers": weight_containers(q.intgraph)},
            "time_to_quantize_s": q.seconds,
            "config": config.to_dict(), "detect_options": asdict(opts),
            "preprocessing": json.loads(detector_metadata(info)["edgeslim.preprocessing"]),
        }
        if plan is not None:
            summary["plan"] = plan.to_dict()
        if analyze is not None:  # the integer engine: its detections, and overflow statistics (seed 000)
            check_requant(q.intgraph, analyze.requant)
            summary["engine_options"] = asdict(analyze)
            if analyze.engine:
                summary.update(evaluate_models({"engine": engine_runner(q.intgraph, analyze)}, test, decoder, opts,
                                               desc="integer engine", info=info))
            if analyze.overflow:
                sub = test.subset(min(analyze.overflow_images, len(test)), 0)
                summary["overflow"] = overflow_summary(
                    q.intgraph, (to_model_order(x, info) for x, _, _ in sub.batches(opts.batch_size,
                                                                                   desc="overflow statistics")),
                    analyze)
        if lite is not None:
            summary.update(_tflite_fields(lite, stage, formats, results.pop("tflite_litert"), x_cal, info))
        if provenance is not None:
            summary["provenance"] = provenance
        (stage / "encodings.json").write_text(json.dumps(encodings(q.intgraph), indent=1))
        from .report.detect_html import write_detect_report

        write_detect_report(summary, list(info.class_names), stage / "report.html")
        return summary

    return staged(out, work)


def _tflite_fields(lite, stage: Path, formats: tuple[str, ...], scored: dict, x_cal, info: ModelInfo) -> dict:
    """The ``tflite`` (and ``mcu``) summary fields: the files, the mAP of the ``.tflite`` in LiteRT, and the engine's
    ``tflite`` mode against LiteRT / TFLM on two calibration images."""
    from .export.tflm import agreement, write_files

    fb, tg, meta = lite
    fields = write_files(fb, tg, meta, stage, formats)
    fields["tflite"].update(scored, scored_by="LiteRT (XNNPACK, 1 thread), batch 1, the numpy decoder",
                            engine_vs_runtimes=agreement(tg, fb, x_cal[:2]))
    return fields


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
