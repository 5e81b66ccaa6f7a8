"""The detect task on the command line (``tasks.detect.Detect``): built from YOLO-format sets, and its console
summaries of ``quantize`` / ``analyze`` and of ``qat``."""

from __future__ import annotations

from pathlib import Path

from ..common import detect_data, simulate_size
from ..lines import float_line, overflow_line, tflite_line, weights_line

__all__ = ["build", "print_quantize", "print_qat"]


def build(args, model, info, verb: str):
    """The ``Detect`` task of the options for ``verb`` (see ``cli.tasks.build_task``): small batches (detector
    images are large), the detector's decoder and class names in ``info``."""
    from ...config import DetectOptions
    from ...tasks import Detect

    if verb == "qat":
        calib, test, info = detect_data(args, info, source="train_data")
        opts = DetectOptions(batch_size=min(args.batch_size, 16), threads=args.threads)
    else:
        calib, test, info = detect_data(args, info)
        extra = ({"simulation_images": simulate_size(args, 16), "decoded_output": args.decoded_output}
                 if verb == "quantize" else {})
        opts = DetectOptions(conf_thres=args.conf_thres, iou_thres=args.iou_thres, cm_conf=args.cm_conf,
                             batch_size=min(args.batch_size, 16), threads=args.threads, **extra)
    return Detect(calib, test, opts, info=info), info


def print_quantize(s, out: Path) -> None:
    """The detect summary (a ``DetectResult`` or its summary dict): mAP, precision, recall, F1, size, latency and FPS
    per model, then the one-line notes."""
    from ...report.provenance import preprocessing_line
    from ...report.results import DetectResult

    r = DetectResult.of(s)
    lat, images = r.latency_ms, r.images
    if r.has("preprocessing"):
        print(preprocessing_line(r.preprocessing))
    print(f"\n{r.model} on {images['test']} images ({images['test_boxes']} boxes) at {images['imgsz']}")
    print(f"{'':<26}{'mAP@.5':>8}{'mAP@.5:.95':>12}{'P':>7}{'R':>7}{'F1':>7}{'ONNX KiB':>10}{'ms':>9}{'FPS':>7}")
    n_sim = images["test"] if r.quantized.images is None else r.quantized.images
    rows = [(f"FP32 (PyTorch, {n_sim} img)", r.fp32, None), (f"fake-quant ({n_sim} img)", r.quantized, None),
            ("FP32 ONNX", r.onnx_fp32, "fp32"), ("INT8 ONNX (onnxruntime)", r.onnx_int8, "int8")]
    if r.engine is not None:
        rows.append(("integer engine", r.engine, None))
    for label, m, file in rows:
        extra = (f"{getattr(r.size_bytes, file) / 1024:>10.1f}{getattr(lat, file):>9.2f}"
                 f"{getattr(lat, 'fps_' + file):>7.1f}" if file else "")
        print(f"{label:<26}{m.map50:>8.4f}{m.map50_95:>12.4f}{m.precision:>7.3f}{m.recall:>7.3f}"
              f"{m.f1:>7.3f}{extra}")
    g = r.onnx_int8_graph
    print(f"integer convs in onnxruntime: {g.integer_convs}/{g.total_convs}; INT8/FP32 latency "
          f"{lat.int8_over_fp32:.2f}x (batch 1, {lat.threads} thread(s)); quantized in {r.time_to_quantize_s:.1f} s")
    float_line(g.float_ops_profile)
    weights_line(r.config, g.weight_containers)
    overflow_line(r.overflow, "images")
    d = r.decoded_output
    if d is not None:
        print(f"decoded-output files ({d['output']} {d['shape']}): mAP@.5 FP32 {d['fp32']['map50']:.4f}, INT8 "
              f"{d['int8']['map50']:.4f} (NMS only after the graph)")
    tflite_line(r)
    print(f"wrote {out}/summary.json, report.html, model_fp32.onnx, model_int8.onnx, encodings.json")
    if d is not None:
        print(f"      {', '.join(d['files'].values())}")


def print_qat(s, out) -> None:
    """mAP of FP32, the PTQ start, QAT and the INT8 file (where each was scored)."""
    from ...report.results import QATResult

    r = QATResult.of(s)
    for k in ("fp32", "ptq", "qat", "onnx_int8"):
        m = getattr(r, k)
        if m is not None and m.map50 is not None:
            print(f"{k:<10} mAP@.5 {m.map50:.4f}  mAP@.5:.95 {m.map50_95:.4f}")
    f = r.onnx_int8
    print(f"wrote {out}/summary.json" + (", model_int8.onnx, model_fp32.onnx" if f.map50 is not None
                                          else f" (not exported: {f.reason})"))
