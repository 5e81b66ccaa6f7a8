"""A self-contained HTML report (tables + inline PNG plots) rendered from ``summary.json`` data."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import numpy as np

from .results import ClassifyResult

__all__ = ["png", "table", "layer_error_plot", "overflow_heatmap", "engine_section", "size", "STYLE", "FLIPS", "wide",
           "near_chance", "base_top1", "summary_rows", "layer_rows", "marked_table", "preprocessing_html",
           "provenance_html", "write_report"]


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


def layer_error_plot(layers: list[dict], worst: int = 3) -> str:
    """Activation SQNR per layer in graph order; the ``worst`` lowest in red (the table lists them first)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(layers)), 3.2))
    low = set(sorted(range(len(layers)), key=lambda i: layers[i]["sqnr_db"])[:worst])
    ax.bar(range(len(layers)), [min(r["sqnr_db"], 80) for r in layers],
           color=["#cc3311" if i in low else "#4477aa" for i in range(len(layers))])
    ax.set_xticks(range(len(layers)), [r["tensor"] for r in layers], rotation=90, fontsize=7)
    ax.set_ylabel("SQNR vs FP32 (dB)")
    ax.set_title("Per-layer quantization error (higher is better; red: the worst)")
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


def engine_section(r: ClassifyResult) -> list[str]:
    """Integer engine and overflow tables (``edgeslim analyze``)."""
    parts = []
    if r.engine is not None:
        e, opts = r.engine_vs_onnx, r.engine_options
        parts += ["<h2>Integer engine (numpy)</h2>",
                  wide(table([[r.engine.top1, r.onnx_int8.top1, r.quantized.top1, e["mismatch_fraction"],
                                e["max_abs_diff"], opts["requant"], opts["accumulator_bits"]]],
                              ["engine top-1", "onnxruntime top-1", "fake-quant top-1", "output elements differing",
                               "max diff (LSB)", "requantization", "accumulator bits"]))]
        if near_chance(r.engine.top1, r.chance_top1):
            why = ("so is onnxruntime's: the model itself scores near chance on this data"
                   if near_chance(r.onnx_int8.top1, r.chance_top1) else
                   "onnxruntime's is not: the engine's arithmetic (accumulator bits, overflow mode, requantization) "
                   "breaks the model")
            parts.append(f"<p class='warn'>The integer engine's top-1 ({r.engine.top1:.4f}) is near chance "
                         f"({r.chance_top1:.3f}); {why}.</p>")
    if r.overflow is not None:
        o = r.overflow
        rows = [[r["name"], *(100 * r["product_int8"][k] for k in ("avg", "max", "min")),
                 *(100 * r["sum_int16"][k] for k in ("avg", "max", "min")), r["accumulator_overflows"]] for r in o["layers"]]
        parts += [f"<h2>Overflow statistics ({o['images']} images, {o['accumulator_bits']}-bit accumulator, "
                  f"{o['mode']})</h2>",
                  "<p>Per layer, over its output filters: % of int8 x int8 products outside INT8 "
                  "and % of per-pixel sums outside INT16; accumulator overflow events actually hit.</p>",
                  wide(table(rows, ["layer", "INT8 product avg %", "max %", "min %", "INT16 sum avg %", "max %", "min %",
                                    "accumulator overflows"])),
                  overflow_heatmap(o["per_filter"], "sum_int16", "per-filter INT16 sum overflow"),
                  overflow_heatmap(o["per_filter"], "product_int8", "per-filter INT8 product overflow")]
    return parts


def size(n) -> str:
    """Bytes as KiB / MiB (one decimal)."""
    if n in ("", None):
        return ""
    n = float(n)
    return f"{n / 1024:.1f}\u00a0KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f}\u00a0MiB"  # no break inside


STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} th{background:#eee}"
         ".wide{overflow-x:auto;max-width:100%} img{max-width:100%;height:auto} tr.worst td{background:#fde2e2}"
         ".warn{color:#a00;font-weight:bold} table.prov{width:100%;table-layout:fixed}"
         " table.prov th{width:11em;text-align:left} table.prov td{text-align:left;overflow-wrap:anywhere}</style>")
FLIPS = ("<p><b>Flips</b>: test images whose predicted class differs from the FP32 model's prediction (right or wrong); "
         "the accuracy change can be small while many predictions change.</p>")


def wide(html_table: str) -> str:
    """A table that scrolls sideways on its own instead of widening the page."""
    return f'<div class="wide">{html_table}</div>'


def near_chance(top1: float, chance: float | None) -> bool:
    """A top-1 within a tenth of the way from chance to perfect: the model (or engine) is not working."""
    return chance is not None and top1 <= chance + 0.1 * (1 - chance)


def base_top1(r: ClassifyResult) -> float:
    """The FP32 model's top-1 every change is measured against: the FP32 ONNX file's (older summaries: ``fp32``)."""
    return (r.onnx_fp32 if r.onnx_fp32 is not None else r.fp32).top1


def summary_rows(r: ClassifyResult) -> list[list]:
    """FP32 (PyTorch on the simulation subset), FP32 ONNX, fake-quant, INT8 ONNX: top-1, change vs the FP32 ONNX
    file (points), flips, size, latency and speed-up vs FP32 ONNX per batch size."""
    lat, sz, q, o = r.latency_ms, r.size_bytes, r.quantized, r.onnx_int8
    base = base_top1(r)
    n = len(lat.fp32)
    delta = lambda t: f"{100 * (t - base):+.2f}"  # noqa: E731
    sim = "" if q.images is None else q.images
    rows = []
    if r.fp32.pytorch_top1_on_subset is not None:
        rows.append([f"FP32 (PyTorch, {sim} images)", r.fp32.pytorch_top1_on_subset, "", "", "",
                     *[""] * (2 * n)])
    rows += [["FP32 ONNX (onnxruntime)", base, "+0.00", "", size(sz.fp32),
              *lat.fp32.values(), *["1.00x"] * n],
             [f"quantized (fake-quant, PyTorch, {sim} images)", q.top1, delta(q.top1), q.flips_vs_fp32, "",
              *[""] * (2 * n)],
             ["INT8 ONNX (onnxruntime)", o.top1, delta(o.top1), o.flips_vs_fp32, size(sz.int8), *lat.int8.values(),
              *[f"{lat.fp32[b] / lat.int8[b]:.2f}x" for b in lat.fp32]]]
    return rows


def layer_rows(layers: list[dict], worst: int = 3) -> tuple[list[list], int]:
    """Per-layer rows, worst activation SQNR first (the first ``worst`` highlighted), weight SQNR next to it."""
    order = sorted(layers, key=lambda r: r["sqnr_db"])
    rows = [[r["tensor"], r["sqnr_db"], r.get("weight_sqnr_db", ""), r["bits"], r["scale"], r["zero_point"],
             "int" if r["signed"] else "uint"] for r in order]
    return rows, min(worst, len(rows))


def marked_table(rows: list[list], header: list[str], marked: int) -> str:
    """``table`` with the first ``marked`` rows highlighted (class ``worst``)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    mark = ' class="worst"'
    body = "".join(f"<tr{mark if i < marked else ''}>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for i, r in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def preprocessing_html(p) -> str:
    if not isinstance(p, dict):
        return f"<p><b>Preprocessing</b>: {html.escape(str(p))}</p>"
    nums = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
    return (f"<p><b>Preprocessing</b> (what the ONNX files expect; also in their metadata, "
            f"<code>edgeslim.preprocessing</code>): {'x'.join(map(str, p.get('size', [])))} pixels, "
            f"channel order {html.escape(str(p.get('channel_order', '')))}, resize {html.escape(str(p.get('resize', '')))}, "
            f"mean ({nums(p.get('mean', []))}), std ({nums(p.get('std', []))}); "
            f"{html.escape(str(p.get('units', '')))}.</p>")


def provenance_html(p: dict | None) -> list[str]:
    if not p:
        return []
    items = [("model", p.get("model")),
             ("weights", f"{p['weights']} (sha256 {p.get('weights_sha256') or 'n/a'})" if p.get("weights") else "none"),
             *((f"data: {k}", v) for k, v in p.get("data", {}).items()),
             ("calibration size", p.get("calib_size")), ("seed", p.get("seed")),
             ("packages", ", ".join(f"{k} {v}" for k, v in p.get("versions", {}).items())),
             ("CPU", f"{p['cpu']['name']} ({p['cpu']['int8_flags']}, {p['cpu']['cores']} cores)" if p.get("cpu") else ""),
             ("command", p.get("command"))]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    return ["<h2>Provenance</h2>", f'<table class="prov">{body}</table>']


def write_report(s, path: Path) -> Path:
    """``report.html`` of ``quantize`` / ``analyze`` for a classifier: ``s`` a ``ClassifyResult`` or its summary."""
    r = ClassifyResult.of(s)
    lat = r.latency_ms
    lat_cols = [f"latency ms ({k}, {lat.threads} thread)" for k in lat.fp32]
    speed_cols = [f"speed-up vs FP32 ({k})" for k in lat.fp32]
    cfg, o = r.config, r.onnx_int8
    command = "analyze" if (r.engine is not None or r.overflow is not None) else "quantize"
    chance = r.chance_top1
    rows, marked = layer_rows(r.layers)
    warn = ""
    if near_chance(base_top1(r), chance):
        warn = (f"<p class='warn'>The FP32 model scores near chance ({chance:.3f}) on this data: check the weights, "
                "the data and the preprocessing before reading the quantization results.</p>")
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>edgeslim {command}: {html.escape(str(r.model))}</title>",
        STYLE,
        f"<h1>edgeslim {command}: {html.escape(str(r.model))}</h1>",
        f"<p>W{cfg['w_bits']}A{cfg['a_bits']}, {cfg['granularity']} weights, {cfg['scheme']}, scale {cfg['scale']}, "
        f"calibrator {cfg['calibrator']}, fusion {'on' if cfg['fuse'] else 'off'}; "
        f"{r.images['calibration']} calibration / {r.images['test']} test images; "
        f"quantized in {r.time_to_quantize_s:.2f} s.</p>",
        preprocessing_html(r.preprocessing) if r.has("preprocessing") else "",
        warn,
        "<h2>Accuracy, size, latency</h2>",
        "<p>Accuracy change in points (top-1 x 100) and speed-up against the FP32 ONNX file, both files run in "
        "onnxruntime on every test image; the PyTorch rows use a class-balanced subset.</p>",
        wide(table(summary_rows(r), ["model", "top-1", "change vs FP32 (points)", "flips vs FP32", "ONNX size",
                                     *lat_cols, *speed_cols])),
        FLIPS,
        f"<p>onnxruntime runs {o.integer_convs} of {o.total_convs} convolutions as "
        "integer kernels (QLinearConv). Optimized graph ops: "
        f"{html.escape(', '.join(f'{k} x{v}' for k, v in o.optimized_ops.items()))}.</p>",
        "<h2>Per-layer quantization error</h2>",
        layer_error_plot(r.layers),
        f"<p>Worst layers first (lowest activation SQNR; the {marked} worst highlighted). Activation SQNR is the "
        "error built up to the layer's output, end to end; weight SQNR is the layer's own weight rounding.</p>",
        wide(marked_table(rows, ["tensor", "activation SQNR dB", "weight SQNR dB", "bits", "scale", "zero point",
                                 "type"], marked)),
        *engine_section(r),
        *provenance_html(r.provenance),
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
