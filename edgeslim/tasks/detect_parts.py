"""The detect task's shared parts (``--task detect``): options, data checks, runners, mAP scoring and the
deployable files' metadata, used by the ``detect`` task (``tasks.detect``: quantize / analyze through
``jobs.quantize``), ``sensitivity`` / ``mixed`` (``jobs.mixed``), ``qat`` (``jobs.qat``) and the
benchmarks.

The network's outputs are the raw head tensors (``models.yolo``): decoding (sigmoid, grid, anchors) and NMS run
on the host in numpy, for every model variant alike (PyTorch FP32, the fake-quant simulation, onnxruntime FP32
and INT8), on the same letterboxed batches. Metrics: COCO-style mAP@0.5 and mAP@0.5:0.95
(``eval.detection.evaluate_map``) and the confusion-matrix precision / recall / F1 at IoU 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..algorithms import layer_groups as lg
from ..algorithms import ptq
from ..config import AnalyzeOptions, DetectOptions, MixedPlan, PTQConfig
from ..data.detection import DetectionDataset
from ..engine.run import run as run_engine
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..eval.detection import confusion_matrix, evaluate_map, nms, nms_rows, precision_recall_f1
from ..models import ModelInfo
from ..quant.precision import LayerPrecision

__all__ = ["Decoder", "parse_groups", "group_plan", "flat_outputs", "detect", "yolo_rows", "scores", "to_model_order", "evaluate_models", "model_detections", "torch_runner", "engine_runner", "ort_runner", "check_detector", "calibration_images", "fit_options", "calibrated", "paired_latency", "detector_metadata", "add_metadata", "decoded_files"]

Decoder = Callable[[Sequence[np.ndarray]], np.ndarray]  # raw head outputs -> (N, A, 4 + nc) xyxy + scores


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
    return lg.group_plan(groups, parse_groups(groups, spec))


def flat_outputs(y) -> list[np.ndarray]:
    if isinstance(y, torch.Tensor):
        return [y.detach().numpy()]
    return [a for t in y for a in flat_outputs(t)]


def detect(outputs: Sequence[np.ndarray], decoder: Decoder, opts: DetectOptions) -> list[np.ndarray]:
    """Raw head outputs of one batch -> per image (k, 6) ``[x1, y1, x2, y2, score, class]``.

    YOLOv5 / YOLOv3 heads decode only the rows whose objectness can reach the threshold (``yolo_rows``): the same
    detections as NMS of the whole decoded output."""
    rows = yolo_rows(decoder, outputs, opts.conf_thres)
    if rows is None:
        return nms(decoder(outputs), conf_thres=opts.conf_thres, iou_thres=opts.iou_thres)
    return [nms_rows(b, sc, conf_thres=opts.conf_thres, iou_thres=opts.iou_thres) for b, sc in rows]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # models.yolo's decoders' form, so the values are the same bits


def yolo_rows(decoder: Decoder, outputs: Sequence[np.ndarray],
              conf_thres: float) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per image (boxes (k, 4) xyxy, scores (k, nc)), float32: the rows of ``decoder(outputs)`` (in its order) whose
    objectness sigmoid is above ``conf_thres``; None for decoders other than ``YoloV5Decoder`` / ``YoloV3Decoder``.

    Their class scores are ``sig(obj) * sig(cls)`` with ``sig(cls) <= 1``, so a row with ``sig(obj) <= conf_thres``
    holds no score above it and NMS never sees it (at the usual 0.001 threshold about 93% of yolov5n's rows on
    COCO). The kept rows are decoded with the decoders' own arithmetic, element by element (the same float32
    operations in the same order: Jocher et al., YOLOv5 v6 ``Detect``; Redmon and Farhadi 2018 for v3)."""
    from ..models.yolo import YoloV3Decoder, YoloV5Decoder

    kind = type(decoder)
    if kind not in (YoloV5Decoder, YoloV3Decoder) or len(outputs) != len(decoder.strides):
        return None
    nc, na = decoder.nc, decoder.anchors.shape[1]
    levels = []
    for i, out in enumerate(outputs):
        out = np.asarray(out, dtype=np.float32)
        n, _, h, w = out.shape
        p = out.reshape(n, na, nc + 5, h, w)
        img, a, y, x = np.nonzero(_sigmoid(p[:, :, 4]).astype(np.float64) > conf_thres)
        t = p[img, a, :, y, x]  # (k, nc + 5)
        grid = np.stack((x, y), -1).astype(np.float32)
        anchor, stride = decoder.anchors[i][a], decoder.strides[i]
        if kind is YoloV5Decoder:
            sxy = _sigmoid(t[:, :4])
            xy, wh = (sxy[:, :2] * 2 - 0.5 + grid) * stride, (sxy[:, 2:] * 2) ** 2 * anchor
        else:
            xy, wh = (_sigmoid(t[:, :2]) + grid) * stride, np.exp(np.minimum(t[:, 2:4], 30.0)) * anchor
        scores = _sigmoid(t[:, 4:5]) * _sigmoid(t[:, 5:])
        levels.append((img, np.concatenate((xy - wh / 2, xy + wh / 2), -1), scores))
    n = len(outputs[0])
    return [(np.concatenate([b[img == j] for img, b, _ in levels]), np.concatenate([sc[img == j] for img, _, sc in levels]))
            for j in range(n)]


def scores(dets: list[np.ndarray], targets: list, num_classes: int, opts: DetectOptions,
           detail: bool = False) -> dict:
    """mAP and the confusion-matrix figures of one model's detections; with ``detail`` also per class (AP, AP@.5,
    ground-truth count, tp / fp / fn, precision, recall) and the confusion matrix itself (``m[predicted, true]``,
    the last row / column background: missed / false detections)."""
    m = evaluate_map(dets, targets, num_classes=num_classes)
    cm = confusion_matrix(dets, targets, num_classes=num_classes, iou_thres=opts.cm_iou, conf_thres=opts.cm_conf)
    prf = precision_recall_f1(cm)
    out = {"map50": m["map50"], "map50_95": m["map50_95"],
           "precision": prf["micro"]["precision"], "recall": prf["micro"]["recall"], "f1": prf["micro"]["f1"],
           "confusion": {"tp": prf["micro"]["tp"], "fp": prf["micro"]["fp"], "fn": prf["micro"]["fn"],
                         "macro_f1": prf["macro"]["f1"] if "macro" in prf else None}}
    if detail:
        pc = prf["per_class"]
        out["per_class"] = {"ap50": m["per_class_ap50"], "ap50_95": m["per_class_ap"], "num_gt": m["per_class_num_gt"],
                            "tp": pc["tp"], "fp": pc["fp"], "fn": pc["fn"], "precision": pc["precision"],
                            "recall": pc["recall"]}
        out["confusion_matrix"] = cm.tolist()
    return out


def to_model_order(x: np.ndarray, info: ModelInfo) -> np.ndarray:
    """RGB batches (the data layer's order) -> the channel order the model was trained on."""
    return np.ascontiguousarray(x[:, ::-1]) if getattr(info, "channel_order", "RGB") == "BGR" else x


def evaluate_models(models: dict[str, Callable[[np.ndarray], list[np.ndarray]]], data: DetectionDataset,
                    decoder: Decoder, opts: DetectOptions, desc: str = "evaluating",
                    info: ModelInfo | None = None, detail: bool = False) -> dict[str, dict]:
    """Run each model on the same batches (decoded once) and score its detections (``detail``: per class too)."""
    dets, targets = model_detections(models, data, decoder, opts, desc, info)
    return {k: scores(v, targets, max(data.num_classes, 1), opts, detail) for k, v in dets.items()}


def model_detections(models: dict[str, Callable[[np.ndarray], list[np.ndarray]]], data: DetectionDataset,
                     decoder: Decoder, opts: DetectOptions, desc: str = "evaluating",
                     info: ModelInfo | None = None) -> tuple[dict[str, list[np.ndarray]], list]:
    """Each model's detections per image on the same batches (decoded once), and the images' targets."""
    dets: dict[str, list[np.ndarray]] = {k: [] for k in models}
    targets: list = []
    for x, tg, _ in data.batches(opts.batch_size, desc=desc):
        targets += tg
        x = to_model_order(x, info) if info is not None else x
        for k, fn in models.items():
            dets[k] += detect(fn(x), decoder, opts)
    return dets, targets


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], list[np.ndarray]]:
    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return flat_outputs(model(torch.from_numpy(x)))
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
    ptq.calibrate(gm, lambda: (torch.from_numpy(x_cal[i:i + step]) for i in range(0, len(x_cal), step)), progress=True,
                  total=-(-len(x_cal) // step))
    return x_cal, gm


def paired_latency(fp32_path: Path, int8_path: Path, info: ModelInfo, opts: DetectOptions) -> dict:
    """onnxruntime latency of the two files at batch 1, interleaved: medians, FPS and the paired ratio."""
    return ort_eval.fp32_int8_latency(fp32_path, int8_path, info.input_shape, threads=opts.threads,
                                      rounds=opts.latency_rounds, warmup=3, seconds=opts.latency_seconds)


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

    from ..export.onnx_qdq import save_onnx, set_metadata

    save_onnx(set_metadata(onnx.load(str(path)), values), path)


def decoded_files(fp32_path: Path, int8_path: Path, test: DetectionDataset, decoder: Decoder, opts: DetectOptions,
                  info: ModelInfo) -> dict:
    """``model_*_decoded.onnx`` next to the raw-output files, scored on ``test`` through their decoded output
    (only NMS after the graph): the same mAP as the raw files through the numpy decoder, to float rounding."""
    import onnx

    from ..eval.detection import DecodedLayout
    from ..export.decoded import DECODED_OUTPUT, with_decoder
    from ..export.onnx_qdq import save_onnx

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
