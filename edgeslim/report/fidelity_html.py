"""The ``report.html`` of ``quantize`` / ``analyze`` for the label-free fidelity task: how closely each output of the
INT8 file follows the FP32 file's (both in onnxruntime), what still runs in float, size and speed, the integer
engine's agreement when it ran, the preprocessing and the provenance."""

from __future__ import annotations

import html
from pathlib import Path

from ..io.atomic import atomic_write_bytes
from .html import STYLE, plt, png, preprocessing_html, provenance_html, size, table, wide
from .results import FidelityResult

__all__ = ["write_fidelity_report"]


def _db(r: dict) -> str:
    return "identical" if r.get("identical") else f"{r['sqnr_db']:.2f}"


def output_rows(per_output: dict) -> list[list]:
    """One row per output, worst SQNR first."""
    rows = sorted(per_output.items(), key=lambda kv: (kv[1].get("identical", False), kv[1].get("sqnr_db") or 0.0))
    return [[name, "x".join(map(str, r["shape"])), _db(r), f"{r['cosine']:.5f}", f"{r['max_abs_error']:.4g}",
             f"{r['max_error_lsb']:.1f}" if "max_error_lsb" in r else "", r.get("top1_agreement", "")]
            for name, r in rows]


def sqnr_figure(per_output: dict) -> str:
    """One bar per output: its SQNR against the FP32 file (identical outputs drawn at the top of the axis)."""
    names = list(per_output)
    values = [r["sqnr_db"] if not r.get("identical") else None for r in per_output.values()]
    top = max([v for v in values if v is not None] + [1.0]) * 1.1
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 2.6))
    ax.bar(range(len(names)), [top if v is None else v for v in values], color="#4477aa")
    ax.set_xticks(range(len(names)), [n[:24] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("SQNR vs FP32 (dB)")
    fig.tight_layout()
    return png(fig)


def _engine(r: FidelityResult) -> list[str]:
    if r.engine_vs_onnx is None:
        return []
    rows = [[name, f"{e.get('max_diff_steps', 0.0):.0f}", _db(r.engine["fidelity_vs_fp32"][name])]
            for name, e in r.engine_vs_onnx.items()]
    return ["<h2>Integer engine (numpy)</h2>",
            "<p>The engine runs the integer graph; per output, its largest distance from onnxruntime's INT8 result in "
            "output steps (0 = the same codes) and its SQNR against the FP32 file.</p>",
            wide(table(rows, ["output", "steps from onnxruntime", "engine SQNR dB vs FP32"]))]


def write_fidelity_report(s, path: Path) -> Path:
    """``report.html`` of ``quantize`` / ``analyze`` without labels: ``s`` a ``FidelityResult`` or its summary."""
    r = FidelityResult.of(s)
    o, lat, sz = r.onnx_int8, r.latency_ms, r.size_bytes
    command = "analyze" if r.engine_vs_onnx is not None or r.overflow is not None else "quantize"
    islands = sorted({i["fn"] for i in o.float_islands or []})
    profile = o.float_ops_profile or {}
    shares = profile.get("time_share", {}) if isinstance(profile, dict) else {}
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>edgeslim {command}: {html.escape(str(r.model))}</title>", STYLE,
        f"<h1>edgeslim {command}: {html.escape(str(r.model))} (no labels: INT8 vs FP32)</h1>",
        f"<p>Headline: the worst output's SQNR, <b>{r.headline['value'] if r.headline['value'] is not None else 'identical'}"
        f"</b> dB, on {r.inputs['test']} inputs (calibrated on {r.inputs['calibration']}). SQNR is "
        "10 log10(signal / error) of the INT8 file's output against the FP32 file's; each extra 6 dB halves the error. "
        "LSB: the largest error in steps of the output's quantizer.</p>",
        sqnr_figure(o.fidelity_vs_fp32),
        wide(table(output_rows(o.fidelity_vs_fp32),
                   ["output", "shape", "SQNR dB", "cosine", "max error", "max error (LSB)", "top-1 agreement"])),
        "<h2>Size and speed</h2>",
        wide(table([["FP32 ONNX", size(sz.fp32), f"{lat.fp32:.3f}", "1.00x"],
                    ["INT8 ONNX", size(sz.int8), f"{lat.int8:.3f}", f"{1 / lat.int8_over_fp32:.2f}x"]],
                   ["file", "size", f"latency ms (batch {lat.batch}, {lat.threads} thread)", "speed-up"])),
        f"<p>Integer convolutions in onnxruntime's optimized graph: {o.integer_convs} of {o.total_convs}. "
        + (f"Ops kept in float between integer tensors (float islands): {html.escape(', '.join(islands))}. "
           if islands else "No float islands. ")
        + (f"Kernel time by kind: {html.escape(', '.join(f'{k} {v:.0%}' for k, v in shares.items()))}."
           if shares else "") + "</p>",
        *_engine(r),
        preprocessing_html(r.preprocessing),
        *provenance_html(r.provenance),
    ]
    return atomic_write_bytes(path, "\n".join(parts).encode("utf-8"), "report")
