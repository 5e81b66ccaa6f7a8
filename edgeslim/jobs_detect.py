"""The ``quantize`` / ``analyze`` jobs for detectors (``--task detect``): mAP and confusion matrices.

The network's outputs are the raw head tensors (``models.yolo``): decoding (sigmoid, grid, anchors) and NMS run
on the host in numpy, for every model variant alike (PyTorch FP32, the fake-quant simulation, onnxruntime FP32
and INT8), on the same letterboxed batches. Metrics: COCO-style mAP@0.5 and mAP@0.5:0.95
(``eval.detection.evaluate_map``) and seed 000's confusion-matrix precision / recall / F1 at IoU 0.5.
Artifacts are staged and moved into ``out`` at the end, ``summary.json`` last.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import api
from .algorithms import mixed_precision as mp, ptq
from .analysis import AnalyzeOptions, check_requant, overflow_summary
from .config import MixedPlan, PTQConfig
from .data.detection import DetectionDataset
from .errors import EdgeslimError
from .engine.run import run as run_engine
from .eval import ort as ort_eval
from .io.staging import staged
from .eval.detection import confusion_matrix, evaluate_map, nms, precision_recall_f1
from .export.onnx_qdq import save_onnx, to_onnx, weight_containers
from .lower import lower
from .models import ModelInfo
from .quant.precision import LayerPrecision
from .report.encodings import encodings

Decoder = Callable[[Sequence[np.ndarray]], np.ndarray]  # raw head outputs -> (N, A, 4 + nc) xyxy + scores


@dataclass(frozen=True)
class DetectOptions:
    """Post-processing and measurement settings (the usual mAP-evaluation thresholds by default)."""

    conf_thres: float = 0.001  # candidates for mAP (near-full recall)
    iou_thres: float = 0.6  # NMS
    cm_conf: float = 0.25  # confusion matrix: detections above this score count (seed 000: deployed threshold)
    cm_iou: float = 0.5
    batch_size: int = 8
    threads: int = 1
    latency_rounds: int = 30
    # the ONNX files are scored on every test image; the PyTorch float and fake-quant models (about 3 s per
    # yolov5n image for the simulation) on the first this many (None: all)
    simulation_images: int | None = 16
    # also write model_fp32_decoded.onnx / model_int8_decoded.onnx: the box decoding in the graph (export.decoded)
    decoded_output: bool = False

    def __post_init__(self) -> None:
        for name in ("conf_thres", "iou_thres", "cm_conf", "cm_iou"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise EdgeslimError(f"{name.replace('_', '-')} {v} is outside [0, 1]")
        if self.batch_size <= 0:
            raise EdgeslimError(f"batch size {self.batch_size} is not positive: pass e.g. 8")


def parse_groups(groups: dict[str, tuple[str, ...]], spec: str) -> dict[str, LayerPrecision]:
    """``backbone=8,neck=32,head=fp16`` -> {group: precision}; values are precision tokens or bit counts (32 = FP32)."""
    precisions: dict[str, LayerPrecision] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not value:
            raise EdgeslimError(f"--groups entry {part!r} is not NAME=PRECISION: pass e.g. backbone=8,neck=32,head=32")
        if name not in groups:
            raise EdgeslimError(f"--groups: this model has no group {name!r}: its groups are {', '.join(groups)}")
        precisions[name] = LayerPrecision.parse("fp32" if value == "32" else value)
    return precisions


def group_plan(groups: dict[str, tuple[str, ...]], spec: str) -> MixedPlan:
    """The plan of a ``--groups`` option (groups not named keep the default bits)."""
    return mp.group_plan(groups, parse_groups(groups, spec))


def _flat(y) -> list[np.ndarray]:
    if isinstance(y, torch.Tensor):
        return [y.detach().numpy()]
    return [a for t in y for a in _flat(t)]


def detect(outputs: Sequence[np.ndarray], decoder: Decoder, opts: DetectOptions) -> list[np.ndarray]:
    """Raw head outputs of one batch -> per image (k, 6) ``[x1, y1, x2, y2, score, class]``."""
    return nms(decoder(outputs), conf_thres=opts.conf_thres, iou_thres=opts.iou_thres)


def scores(dets: list[np.ndarray], targets: list, num_classes: int, opts: DetectOptions) -> dict:
    """mAP and the confusion-matrix figures of one model's detections."""
    m = evaluate_map(dets, targets, num_classes=num_classes)
    cm = confusion_matrix(dets, targets, num_classes=num_classes, iou_thres=opts.cm_iou, conf_thres=opts.cm_conf)
    prf = precision_recall_f1(cm)
    return {"map50": m["map50"], "map50_95": m["map50_95"],
            "precision": prf["micro"]["precision"], "recall": prf["micro"]["recall"], "f1": prf["micro"]["f1"],
            "confusion": {"tp": prf["micro"]["tp"], "fp": prf["micro"]["fp"], "fn": prf["micro"]["fn"],
                          "macro_f1": prf["macro"]["f1"] if "macro" in prf else None}}


def to_model_order(x: np.ndarray, info: ModelInfo) -> np.ndarray:
    """RGB batches (the data layer's order) -> the channel order the model was trained on."""
    return np.ascontiguousarray(x[:, ::-1]) if getattr(info, "channel_order", "RGB") == "BGR" else x


def evaluate_models(models: dict[str, Callable[[np.ndarray], list[np.ndarray]]], data: DetectionDataset,
                    decoder: Decoder, opts: DetectOptions, desc: str = "evaluating",
                    info: ModelInfo | None = None) -> dict[str, dict]:
    """Run each model on the same batches (decoded once) and score its detections."""
    dets: dict[str, list[np.ndarray]] = {k: [] for k in models}
    targets: list = []
    for x, tg, _ in data.batches(opts.batch_size, desc=desc):
        targets += tg
        x = to_model_order(x, info) if info is not None else x
        for k, fn in models.items():
            dets[k] += detect(fn(x), decoder, opts)
    return {k: scores(v, targets, max(data.num_classes, 1), opts) for k, v in dets.items()}


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], list[np.ndarray]]:
    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return _flat(model(torch.from_numpy(x)))
    return run


def engine_runner(g, options: AnalyzeOptions) -> Callable[[np.ndarray], list[np.ndarray]]:
    def run(x: np.ndarray) -> list[np.ndarray]:
        y = run_engine(g, x, requant=options.requant, accumulator_bits=options.accumulator_bits,
                       overflow=options.overflow_mode)
        return [y[name] for name in g.output_names]
    return run


def ort_runner(path: Path, threads: int = 0) -> Callable[[np.ndarray], list[np.ndarray]]:
    sess = ort_eval.session(path, threads=threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def check_detector(info: ModelInfo, data: DetectionDataset) -> Decoder:
    decoder = getattr(info, "decoder", None)
    if getattr(info, "task", "classify") != "detect" or decoder is None:
        raise EdgeslimError(f"model {info.name} is not a detector edgeslim can decode: use a detection model "
                            "(yolov5n, fastestdet, yolov3-tiny) with --task detect")
    if not data.has_labels:
        raise EdgeslimError(f"evaluation data {data.name} has no labels: pass a YOLO data set with a labels/ folder")
    names = getattr(info, "class_names", None)
    if names and data.num_classes and len(names) != data.num_classes:
        raise EdgeslimError(f"the model predicts {len(names)} classes but the data names {data.num_classes}: "
                            "pass data for this model")
    if info.input_shape[1] != data.imgsz:
        raise EdgeslimError(f"data is letterboxed to {data.imgsz} but the model takes {info.input_shape[1]}: "
                            "open it with the model's input size")
    return decoder


def calibration_images(calib: DetectionDataset, n: int, seed: int, info: ModelInfo) -> np.ndarray:
    if len(calib) == 0:
        raise EdgeslimError(f"calibration data {calib.name} has no images: pass a folder with images")
    sub = calib.subset(min(n, len(calib)), seed)
    return to_model_order(np.concatenate([x for x, _, _ in sub.batches(16, desc="loading calibration images")]), info)


def fit_options(model: nn.Module, opts: DetectOptions) -> DetectOptions:
    """An imported ONNX model whose reshapes were folded at batch 1 runs one image at a time."""
    if getattr(model, "meta", {}).get("onnx_dynamic_batch") is False and opts.batch_size != 1:
        return replace(opts, batch_size=1)
    return opts


def calibrated(model: nn.Module, info: ModelInfo, calib: DetectionDataset, config: PTQConfig,
               opts: DetectOptions) -> tuple[np.ndarray, "torch.fx.GraphModule"]:
    """Calibration images and the model prepared and calibrated once (plans are frozen from it later)."""
    x_cal = calibration_images(calib, config.calib_size, config.seed, info)
    gm = ptq.prepare(model, info.input_shape, config)
    step = opts.batch_size
    ptq.calibrate(gm, lambda: (torch.from_numpy(x_cal[i:i + step]) for i in range(0, len(x_cal), step)), progress=True)
    return x_cal, gm


def paired_latency(fp32_path: Path, int8_path: Path, info: ModelInfo, opts: DetectOptions) -> dict:
    """onnxruntime latency of the two files at batch 1, interleaved: medians, FPS and the paired ratio."""
    lat = ort_eval.latency_samples({"fp32": fp32_path, "int8": int8_path}, info.input_shape, 1,
                                   threads=opts.threads, rounds=opts.latency_rounds, warmup=3)
    fp32_ms, int8_ms = statistics.median(lat["fp32"]), statistics.median(lat["int8"])
    return {"fp32": fp32_ms, "int8": int8_ms, "int8_over_fp32": ort_eval.paired_ratio(lat, "int8", "fp32"),
            "fps_fp32": 1e3 / fp32_ms, "fps_int8": 1e3 / int8_ms, "batch": 1, "threads": opts.threads}


def detector_metadata(info: ModelInfo) -> dict[str, str]:
    """What a deployment needs to decode the raw outputs (``metadata_props`` of the ONNX files): the decoder and
    its strides / anchors, class names, and the preprocessing (letterbox, pad value, channel order, 1/255)."""
    dec = info.decoder
    decoder = {"name": type(dec).__name__ if dec is not None else None}
    for key in ("strides", "anchors", "nc", "stride", "activated"):
        value = getattr(dec, key, None)
        if value is not None:
            decoder[key] = value.tolist() if hasattr(value, "tolist") else value
    return {"edgeslim.task": "detect", "edgeslim.decoder": json.dumps(decoder),
            "edgeslim.class_names": json.dumps(list(info.class_names)),
            "edgeslim.preprocessing": json.dumps({
                "size": list(info.input_shape[1:]), "resize": "letterbox", "pad_value": 114,
                "channel_order": info.channel_order, "mean": [0.0] * 3, "std": [1.0] * 3,
                "units": "x = pixel / 255, letterboxed (aspect kept, centered, padded)"})}


def add_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    from .export.onnx_qdq import save_onnx, set_metadata

    save_onnx(set_metadata(onnx.load(str(path)), values), path)


def decoded_files(fp32_path: Path, int8_path: Path, test: DetectionDataset, decoder: Decoder, opts: DetectOptions,
                  info: ModelInfo) -> dict:
    """``model_*_decoded.onnx`` next to the raw-output files, scored on ``test`` through their decoded output
    (only NMS after the graph): the same mAP as the raw files through the numpy decoder, to float rounding."""
    import onnx

    from .eval.detection import DecodedLayout
    from .export.decoded import DECODED_OUTPUT, with_decoder
    from .export.onnx_qdq import save_onnx

    paths = {}
    for key, path in (("fp32", fp32_path), ("int8", int8_path)):
        paths[key] = save_onnx(with_decoder(onnx.load(str(path)), decoder),
                               path.with_name(path.stem + "_decoded.onnx"))
    res = evaluate_models({k: ort_runner(p) for k, p in paths.items()}, test, DecodedLayout(), opts,
                          desc="decoded-output files", info=info)
    shape = [list(o.type.tensor_type.shape.dim) for o in onnx.load(str(paths["fp32"])).graph.output][0]
    return {"files": {k: p.name for k, p in paths.items()}, "output": DECODED_OUTPUT,
            "shape": [d.dim_param or d.dim_value for d in shape],
            "layout": "cx, cy, w, h (input pixels), objectness, class probabilities; score = obj x cls",
            **{k: {m: r[m] for m in ("map50", "map50_95")} for k, r in res.items()},
            "size_bytes": {k: p.stat().st_size for k, p in paths.items()}}


def run_detect_quantize(model: nn.Module, info: ModelInfo, calib: DetectionDataset, test: DetectionDataset,
                        config: PTQConfig, out: Path, *, plan: MixedPlan | None = None,
                        opts: DetectOptions = DetectOptions(), analyze: AnalyzeOptions | None = None) -> dict:
    """Quantize a detector on ``calib``, score FP32 / simulation / ONNX FP32 / ONNX INT8 on ``test``, write ``out``."""
    decoder = check_detector(info, test)
    opts = fit_options(model, opts)
    def work(stage: Path) -> dict:
        x_cal = calibration_images(calib, config.calib_size, config.seed, info)
        q = api.quantize(model, x_cal, config, plan=plan, input_shape=info.input_shape, batch_size=opts.batch_size,
                         progress=True)
        fp32_path = api.export_fp32_onnx(model, info.input_shape, stage / "model_fp32.onnx")
        int8_path = api.export_onnx(q, stage / "model_int8.onnx")
        for path in (fp32_path, int8_path):
            add_metadata(path, detector_metadata(info))
        ptq.set_mode(q.model, "quant")
        results = evaluate_models({"onnx_fp32": ort_runner(fp32_path), "onnx_int8": ort_runner(int8_path)}, test,
                                  decoder, opts, info=info)
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
        (stage / "encodings.json").write_text(json.dumps(encodings(q.intgraph), indent=1))
        return summary

    return staged(out, work)


def run_detect_sensitivity(model: nn.Module, info: ModelInfo, calib: DetectionDataset, test: DetectionDataset,
                           config: PTQConfig, out: Path, *, groups: dict[str, tuple[str, ...]],
                           high: LayerPrecision, layers: bool = True, group_table: bool = True,
                           opts: DetectOptions = DetectOptions()) -> dict:
    """Seed 000's per-layer experiment (one layer at ``high``, the rest quantized) and seed 002's Table 2 (every
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
