"""The fidelity task on the command line (``tasks.fidelity.Fidelity``): built from unlabelled inputs (arrays or
images), and its console summaries of ``quantize`` / ``analyze`` and of ``qat``."""

from __future__ import annotations

from pathlib import Path

from ..common import fidelity_inputs
from ..lines import float_line, overflow_line, tflite_line, weights_line

__all__ = ["build", "print_quantize", "print_qat"]


def build(args, model, info, verb: str):
    """The ``Fidelity`` task of the options for ``verb`` (see ``cli.tasks.build_task``), with ``info``."""
    from ...tasks import Fidelity

    # quantize: --calib-size inputs; score: all (the held-out ones lie beyond --calib-size); qat: --train-size
    limit = args.calib_size if verb == "quantize" else (args.train_size if verb == "qat" else None)
    calib, test, spec = fidelity_inputs(args, model, info, calib_limit=limit,
                                        source="train_data" if verb == "qat" else "calib_data")
    fixed_batch = (getattr(model, "meta", {}) or {}).get("onnx_dynamic_batch") is False
    return Fidelity(calib, test, batch_size=1 if fixed_batch else min(args.batch_size, 64), seed=args.seed,
                    spec=spec, threads=args.threads), info


def print_quantize(s, out: Path) -> None:
    """The fidelity summary (a ``FidelityResult`` or its summary dict): INT8 vs FP32 per output (SQNR, cosine,
    largest error, LSB, top-1 agreement), then the one-line notes (integer convs, float islands, engine, overflow,
    .tflite)."""
    from ...report.provenance import preprocessing_line
    from ...report.results import FidelityResult

    r = FidelityResult.of(s)
    o = r.onnx_int8
    if r.has("preprocessing"):
        print(preprocessing_line(r.preprocessing))
    print(f"\n{r.model}: INT8 vs FP32 on {r.inputs['test']} inputs (calibrated on {r.inputs['calibration']}), "
          "both in onnxruntime")
    print(f"{'output':<28}{'shape':<18}{'SQNR dB':>9}{'cosine':>9}{'max err':>11}{'LSB':>7}{'top-1 agr':>10}")
    for name, f in o.fidelity_vs_fp32.items():
        db = "exact" if f["identical"] else f"{f['sqnr_db']:.1f}"
        lsb = f"{f['max_error_lsb']:.1f}" if "max_error_lsb" in f else "-"
        agr = f"{f['top1_agreement']:.4f}" if "top1_agreement" in f else "-"
        print(f"{name[:27]:<28}{str(tuple(f['shape'])):<18}{db:>9}{f['cosine']:>9.5f}{f['max_abs_error']:>11.4g}"
              f"{lsb:>7}{agr:>10}")
    lat = r.latency_ms
    print(f"integer convs in onnxruntime: {o.integer_convs}/{o.total_convs}; ONNX {r.size_bytes.fp32 / 1024:.1f}"
          f" -> {r.size_bytes.int8 / 1024:.1f} KiB; INT8/FP32 latency {lat.int8_over_fp32:.2f}x (batch 1, "
          f"{lat.threads} thread(s)); quantized in {r.time_to_quantize_s:.1f} s")
    float_line(o.float_ops_profile)
    weights_line(r.config, o.weight_containers)
    if o.float_islands:
        ops = sorted({i["fn"] for i in o.float_islands})
        print(f"float islands ({len(o.float_islands)} ops run in FP32 between integer tensors): {', '.join(ops)}")
    if r.engine_vs_onnx is not None:
        worst = max((e.get("max_diff_steps", 0.0) for e in r.engine_vs_onnx.values()), default=0.0)
        print(f"integer engine vs onnxruntime: at most {worst:.0f} output step(s) apart; engine SQNR vs FP32 "
              + ", ".join(f"{k} {'exact' if e['identical'] else format(e['sqnr_db'], '.1f')}"
                          for k, e in r.engine["fidelity_vs_fp32"].items()))
    overflow_line(r.overflow, "inputs")
    tflite_line(r)
    print(f"wrote {out}/summary.json, model_fp32.onnx, model_int8.onnx, encodings.json, report.html")


def print_qat(s, out) -> None:
    """Worst-output SQNR of the PTQ start and of QAT, then the INT8 file's (or why there is none)."""
    from ...report.results import QATResult

    r = QATResult.of(s)
    f = r.onnx_int8
    print(f"\nworst-output SQNR vs FP32 on {r.inputs['test']} inputs: PTQ {r.ptq.sqnr_db:.2f} dB, "
          f"QAT {r.qat.sqnr_db:.2f} dB (PyTorch)")
    if f.fidelity_vs_fp32 is not None:
        print(f"INT8 ONNX vs FP32 ONNX in onnxruntime: {f.headline_sqnr_db:.2f} dB; integer convs "
              f"{f.integer_convs}/{f.total_convs}")
        print(f"wrote {out}/summary.json, model_int8.onnx, model_fp32.onnx, qat_model.pt, encodings.json")
    else:
        print(f"wrote {out}/summary.json (not exported: {f.reason})")
