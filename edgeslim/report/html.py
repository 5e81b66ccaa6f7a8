"""A self-contained HTML report (tables + inline PNG plots) rendered from ``summary.json`` data."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def layer_error_plot(layers: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers)), 3.2))
    ax.bar(range(len(layers)), [min(r["sqnr_db"], 80) for r in layers], color="#4477aa")
    ax.set_xticks(range(len(layers)), [r["tensor"] for r in layers], rotation=90, fontsize=7)
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.set_title("Per-layer quantization error (higher is better)")
    return png(fig)


def overflow_heatmap(per_filter: dict, key: str, title: str) -> str:
    names = list(per_filter)
    width = max(len(v[key]) for v in per_filter.values())
    grid = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        grid[i, : len(per_filter[name][key])] = per_filter[name][key]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(names) + 1.5))
    im = ax.imshow(grid * 100, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("output filter")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="% overflowing")
    return png(fig)


def engine_section(s: dict) -> list[str]:
    """Integer engine and overflow tables (``edgeslim analyze``)."""
    parts = []
    if "engine" in s:
        e = s["engine_vs_onnx"]
        parts += ["<h2>Integer engine (numpy)</h2>",
                  table([[s["engine"]["top1"], s["onnx_int8"]["top1"], s["quantized"]["top1"], e["mismatch_fraction"],
                           e["max_abs_diff"], s["engine_options"]["requant"], s["engine_options"]["accumulator_bits"]]],
                         ["engine top-1", "onnxruntime top-1", "fake-quant top-1", "output elements differing",
                          "max diff (LSB)", "requantization", "accumulator bits"])]
    if "overflow" in s:
        o = s["overflow"]
        rows = [[r["name"], *(100 * r["product_int8"][k] for k in ("avg", "max", "min")),
                 *(100 * r["sum_int16"][k] for k in ("avg", "max", "min")), r["accumulator_overflows"]] for r in o["layers"]]
        parts += [f"<h2>Overflow statistics ({o['images']} images, {o['accumulator_bits']}-bit accumulator, "
                  f"{o['mode']})</h2>",
                  "<p>Per layer, over its output filters: % of int8 x int8 products outside INT8 (seed 000, Table 1) "
                  "and % of per-pixel sums outside INT16 (Table 2); accumulator overflow events actually hit.</p>",
                  table(rows, ["layer", "INT8 product avg %", "max %", "min %", "INT16 sum avg %", "max %", "min %",
                                "accumulator overflows"]),
                  overflow_heatmap(o["per_filter"], "sum_int16", "per-filter INT16 sum overflow"),
                  overflow_heatmap(o["per_filter"], "product_int8", "per-filter INT8 product overflow")]
    return parts


def summary_rows(s: dict) -> list[list]:
    lat, size = s["latency_ms"], s["size_bytes"]
    rows = [["FP32 (PyTorch)", s["fp32"]["top1"], "", size["fp32"], *lat["fp32"].values()],
            ["quantized (fake-quant, PyTorch)", s["quantized"]["top1"], s["quantized"]["flips_vs_fp32"], "", *[""] * len(lat["fp32"])],
            ["INT8 ONNX (onnxruntime)", s["onnx_int8"]["top1"], s["onnx_int8"]["flips_vs_fp32"], size["int8"], *lat["int8"].values()]]
    return rows


def write_report(s: dict, path: Path) -> Path:
    lat_cols = [f"latency ms ({k}, {s['latency_ms']['threads']} thread)" for k in s["latency_ms"]["fp32"]]
    cfg = s["config"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>edgeslim report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} th{background:#eee}</style>",
        f"<h1>edgeslim quantize: {html.escape(str(s['model']))}</h1>",
        f"<p>W{cfg['w_bits']}A{cfg['a_bits']}, {cfg['granularity']} weights, {cfg['scheme']}, scale {cfg['scale']}, "
        f"calibrator {cfg['calibrator']}, fusion {'on' if cfg['fuse'] else 'off'}; "
        f"{s['images']['calibration']} calibration / {s['images']['test']} test images; "
        f"quantized in {s['time_to_quantize_s']:.2f} s.</p>",
        "<h2>Accuracy, size, latency</h2>",
        table(summary_rows(s), ["model", "top-1", "flips vs FP32", "ONNX bytes", *lat_cols]),
        f"<p>onnxruntime runs {s['onnx_int8']['integer_convs']} of {s['onnx_int8']['total_convs']} convolutions as "
        "integer kernels (QLinearConv). Optimized graph ops: "
        f"{html.escape(', '.join(f'{k} x{v}' for k, v in s['onnx_int8']['optimized_ops'].items()))}.</p>",
        "<h2>Per-layer quantization error</h2>",
        layer_error_plot(s["layers"]),
        table([[r["tensor"], r["bits"], r["scale"], r["zero_point"], "int" if r["signed"] else "uint", r["sqnr_db"]]
                for r in s["layers"]], ["tensor", "bits", "scale", "zero point", "type", "SQNR dB"]),
        *engine_section(s),
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
