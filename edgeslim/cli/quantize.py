"""``edgeslim quantize``: post-training quantization of a model into an INT8 ONNX file, scored and reported, for
every task (classify, detect, fidelity); ``analyze`` runs the same with its analysis options."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import model_args, quant_args
from .common import build_task, load_model, mixed_plan, ptq_config, task_name
from .lines import float_line, tflite_line, weights_line

__all__ = ["HELP", "add_arguments", "run", "quantize", "check_formats", "print_summary", "print_detect_summary",
           "print_fidelity_summary", "overflow_line"]

HELP = "post-training quantization -> INT8 ONNX + report"


def add_arguments(p) -> None:
    model_args(p)
    quant_args(p)
    p.add_argument("--plan", help="mixed-precision plan JSON (per-layer precisions; written by `edgeslim mixed`)")
    p.add_argument("--formats", default="onnx", help="comma-separated: onnx (always written), tflite "
                   "(model_int8.tflite, LiteRT int8), tflm (also model_data.h/.cc, op resolver, arena size)")


def run(args) -> int:
    return quantize(args)


def check_formats(args, config) -> tuple[str, ...]:
    """``--formats`` (quantize): checked before any work, including the optional packages TFLite needs."""
    from ..export.tflm import check_config, parse_formats, require_tflite

    formats = parse_formats(getattr(args, "formats", "onnx"))
    require_tflite(formats)
    if formats != ("onnx",):
        check_config(config)
    return formats


def quantize(args, analysis=None) -> int:
    """Quantize, score and write ``--out`` for the task ``--task`` names; ``analysis``: ``analyze``'s function from
    the options to its ``AnalyzeOptions`` (engine, overflow), called once the model and the plan are loaded."""
    from ..jobs.quantize import run_quantize
    from ..report.provenance import provenance
    from ..report.results import QuantizeResult

    config = ptq_config(args)
    formats = check_formats(args, config)
    model, info = load_model(args)
    plan = mixed_plan(args, model, info)
    analyze = analysis(args) if analysis is not None else None
    task = task_name(args, info)
    if formats != ("onnx",):  # what TFLite cannot hold is refused here, before calibration
        from ..export.tflm import check_model, check_plan, require_litert

        check_plan(plan)
        check_model(model)
        if task != "classify":
            require_litert()
    if getattr(args, "decoded_output", False) and task != "detect":
        raise EdgeslimError("--decoded-output writes a detector's box decoding into the graph: it needs --task detect "
                            "and a detector edgeslim can decode")
    job, info = build_task(args, model, info, "quantize")
    summary = run_quantize(model, info, job, config, Path(args.out), plan=plan, analyze=analyze, formats=formats,
                           provenance=provenance(args, getattr(args, "argv", None)))
    PRINTERS[job.name](QuantizeResult.from_summary(summary), Path(args.out))
    return 0


def print_summary(s, out: Path) -> None:
    """The classify summary (``quantize``, ``analyze``, ``demo``; a ``ClassifyResult`` or its summary dict): FP32 /
    fake-quant / INT8 ONNX rows, then one line each on the integer convs, float time, uint8 weights, the engine,
    overflow and the .tflite."""
    from ..report.provenance import preprocessing_line
    from ..report.results import ClassifyResult

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


def overflow_line(overflow: dict | None, what: str, tail: str = "") -> None:
    """The worst layer's INT16 sum overflow (``analyze``), when the statistics ran over some layers."""
    if overflow is None or not overflow["layers"]:
        return
    worst = max(overflow["layers"], key=lambda r: r["sum_int16"]["max"])
    print(f"overflow ({overflow['images']} {what}): worst INT16 sum overflow {worst['sum_int16']['max']:.2%} "
          f"of pixels in a filter of {worst['name']}{tail}")


def print_detect_summary(s, out: Path) -> None:
    """The detect summary (a ``DetectResult`` or its summary dict): mAP, precision, recall, F1, size, latency and FPS
    per model, then the one-line notes."""
    from ..report.provenance import preprocessing_line
    from ..report.results import DetectResult

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


def print_fidelity_summary(s, out: Path) -> None:
    """The fidelity summary (a ``FidelityResult`` or its summary dict): INT8 vs FP32 per output (SQNR, cosine,
    largest error, LSB, top-1 agreement), then the one-line notes (integer convs, float islands, engine, overflow,
    .tflite)."""
    from ..report.provenance import preprocessing_line
    from ..report.results import FidelityResult

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


PRINTERS = {"classify": print_summary, "detect": print_detect_summary, "fidelity": print_fidelity_summary}
