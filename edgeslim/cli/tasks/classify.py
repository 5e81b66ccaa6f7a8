"""The classify task on the command line (``tasks.classify.Classify``): built from labelled image folders, and its
console summaries of ``quantize`` / ``analyze`` / ``demo`` and of ``qat``."""

from __future__ import annotations

from pathlib import Path

from ..common import classify_data, simulate_size
from ..lines import float_line, overflow_line, tflite_line, weights_line

__all__ = ["build", "print_quantize", "print_qat"]


def build(args, model, info, verb: str):
    """The ``Classify`` task of the options for ``verb`` (see ``cli.tasks.build_task``), with ``info``."""
    from ...config import MeasureOptions
    from ...tasks import Classify

    if verb == "qat":  # --batch-size is the training batch; evaluation keeps the task's default
        from ...data import Preprocess, open_dataset

        pre = Preprocess(info.input_shape, info.mean, info.std)
        train = open_dataset(args.train_data, pre, split=args.train_split)
        test = open_dataset(args.data, pre, split=args.data_split)
        if args.eval_size:
            test = test.subset(args.eval_size, args.seed)
        return Classify(train, test), info
    calib, test = classify_data(args, info)
    return Classify(calib, test, batch_size=args.batch_size,
                    measure=MeasureOptions(threads=args.threads, simulation_images=simulate_size(args, 1000))), info


def print_quantize(s, out: Path) -> None:
    """The classify summary (``quantize``, ``analyze``, ``demo``; a ``ClassifyResult`` or its summary dict): FP32 /
    fake-quant / INT8 ONNX rows, then one line each on the integer convs, float time, uint8 weights, the engine,
    overflow and the .tflite."""
    from ...report.provenance import preprocessing_line
    from ...report.results import ClassifyResult

    r = ClassifyResult.of(s)
    lat, q, o = r.latency_ms, r.quantized, r.onnx_int8
    if r.has("preprocessing"):
        print(preprocessing_line(r.preprocessing))
    b = next(iter(lat.fp32))
    print(f"\n{'':<26}{'top-1':>8}{'flips':>8}{'ONNX KiB':>10}{f'ms ({b})':>12}")
    print(f"{'FP32':<26}{r.fp32.top1:>8.4f}{'':>8}{r.size_bytes.fp32 / 1024:>10.1f}{lat.fp32[b]:>12.3f}")
    label = f"fake-quant ({q.images} img)" if q.images is not None else "fake-quant (PyTorch)"
    print(f"{label:<26}{q.top1:>8.4f}{q.flips_vs_fp32:>8}")
    print(f"{'INT8 ONNX (onnxruntime)':<26}{o.top1:>8.4f}{o.flips_vs_fp32:>8}"
          f"{r.size_bytes.int8 / 1024:>10.1f}{lat.int8[b]:>12.3f}")
    print(f"integer convs in onnxruntime: {o.integer_convs}/{o.total_convs}; "
          f"quantized in {r.time_to_quantize_s:.2f} s; INT8/FP32 latency "
          + ", ".join(f"{k} {v:.2f}x" for k, v in lat.int8_over_fp32.items()))
    float_line(o.float_ops_profile)
    weights_line(r.config, o.weight_containers)
    if r.engine is not None:
        e = r.engine_vs_onnx
        print(f"integer engine top-1 {r.engine.top1:.4f}; vs onnxruntime: {e['mismatch_fraction']:.2%} of output "
              f"elements differ, at most {e['max_abs_diff']:.0f} LSB")
    overflow_line(r.overflow, "images", "; see report.html")
    tflite_line(r)
    print(f"wrote {out}/summary.json, report.html, model_fp32.onnx, model_int8.onnx, encodings.json")


def print_qat(s, out) -> None:
    """Top-1 of FP32, the PTQ start, QAT and the INT8 file (or why there is none), then the files written; ``s``: a
    ``QATResult`` or its summary dict."""
    from ...report.results import QATResult

    r = QATResult.of(s)
    f = r.onnx
    print(f"FP32 {r.fp32.top1:.4f}  PTQ {r.ptq.top1:.4f}  QAT {r.qat.top1:.4f}"
          + (f"  ONNX {f.top1:.4f}" if f.top1 is not None else f"  (not exported: {f.reason})"))
    print(f"wrote {out}/summary.json, checkpoint.pt, qat_model.pt, encodings.json"
          + (", model_int8.onnx, model_fp32.onnx" if f.top1 is not None else ""))
