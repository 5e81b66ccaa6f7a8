"""HTML reports of ``edgeslim sensitivity`` (seed 000's per-layer figure, seed 002's group table) and
``edgeslim mixed`` (the search steps and the accuracy / size / latency frontier)."""

from __future__ import annotations

import html
from pathlib import Path

from .html import _png, _table, plt

STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} th{background:#eee}</style>")


def sensitivity_plot(sens: dict) -> str:
    return _png(sensitivity_figure(sens))


def sensitivity_figure(sens: dict):
    """One bar per layer / op: top-1 with only it kept high (seed 000's figure) and with only it quantized."""
    rows = sens["rows"]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.3 * len(rows)), 6.4), sharex=True)
    x = range(len(rows))
    for ax, sweep, ref, ref_label, color in (
            (axes[0], "keep_high", sens["uniform"]["top1"], f"all {sens['low']}", "#4477aa"),
            (axes[1], "only_quantized", sens["fp32_top1"], f"all {sens['high']}", "#cc6677")):
        if not all(sweep in r for r in rows):
            ax.set_visible(False)
            continue
        ax.bar(x, [r[sweep]["top1"] for r in rows], color=[color if r["kind"] == "layer" else "#999999" for r in rows])
        ax.axhline(ref, color="black", lw=1, ls="--", label=ref_label)
        ax.axhline(sens["fp32_top1"], color="green", lw=1, ls=":", label="FP32")
        lo = min(min(r[sweep]["top1"] for r in rows), ref)
        ax.set_ylim(max(0.0, lo - 0.03), min(1.0, max(sens["fp32_top1"], max(r[sweep]["top1"] for r in rows)) + 0.02))
        ax.set_ylabel("top-1 (held-out)")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_title(f"one op kept at {sens['high']}, the rest {sens['low']} (grey: adds / pooling)")
    axes[1].set_title(f"one op at {sens['low']}, the rest {sens['high']}")
    axes[1].set_xticks(list(x), [r["name"] for r in rows], rotation=90, fontsize=7)
    return fig


def sensitivity_table(sens: dict) -> str:
    rows = []
    for r in sens["rows"]:
        kh, oq = r.get("keep_high", {}), r.get("only_quantized", {})
        rows.append([r["name"], r["kind"], r["macs"], r["params"], kh.get("top1", ""), kh.get("delta", ""),
                     kh.get("sqnr_db", ""), oq.get("top1", ""), oq.get("delta", ""), oq.get("sqnr_db", "")])
    return _table(rows, ["op", "kind", "MACs", "params", "keep-high top-1", "gain", "SQNR dB",
                         "only-quantized top-1", "change vs all high", "SQNR dB"])


def group_section(g: dict) -> list[str]:
    names = list(g["groups"])
    rows = [["FP32 (ONNX)", *["32"] * len(names), g["fp32_bytes"], "", g["fp32_top1"], "", "", ""]]
    for r in g["rows"]:
        rows.append(["partial" if r["quantized"] and len(r["quantized"]) < len(names) else
                     ("all quantized" if r["quantized"] else f"all {g['high']}"),
                     *[r["precision"][n] for n in names], r["weight_bytes"], r["onnx_bytes"], r["top1"],
                     r["latency_ms"], r["latency_over_fp32"], r["fps"]])
    return [f"<h2>Groups: every combination at {html.escape(g['high'])} / {html.escape(g['low'])} "
            "(seed 002, Table 2)</h2>",
            "<p>Groups: " + html.escape("; ".join(f"{k} = {'|'.join(v)}" for k, v in g["groups"].items())) +
            ". Top-1 of the exported ONNX model in onnxruntime on the test set; latency batch 1, paired with FP32.</p>",
            _table(rows, ["method", *names, "weight bytes", "ONNX bytes", "top-1", "latency ms", "x FP32", "FPS"])]


def write_sensitivity_report(s: dict, path: Path) -> Path:
    sens = s["sensitivity"]
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeslim sensitivity</title>", STYLE,
             f"<h1>edgeslim sensitivity: {html.escape(str(s['model']))}</h1>",
             f"<p>Low precision {html.escape(sens['low'] if isinstance(sens['low'], str) else str(sens['low']))}, "
             f"high {html.escape(str(sens['high']))}; {sens['images']} held-out images (disjoint from the "
             f"{s['images']['calibration']} calibration images). FP32 top-1 {sens['fp32_top1']:.4f}, uniformly "
             f"quantized {sens['uniform']['top1']:.4f}. Wall time: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in sens["seconds"].items()) + f" (total {sens['total_seconds']:.1f} s; "
             "one calibration, FP32 logits and unchanged activations reused).</p>",
             sensitivity_plot(sens), sensitivity_table(sens)]
    if "groups" in s:
        parts += group_section(s["groups"])
    return _write(parts, path)


def frontier_plot(s: dict) -> str:
    return _png(frontier_figure(s))


def frontier_figure(s: dict):
    """Every evaluated plan: held-out top-1 against stored size and against onnxruntime latency."""
    cands, front = s["candidates"], s["frontier"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lat = [c["latency_ms"] for c in cands]
    for ax, key, label in ((axes[0], "size_bytes", "stored parameters (KiB)"), (axes[1], "latency_ms", "latency ms (batch 1)")):
        xs = [(c[key] / 1024 if key == "size_bytes" else c[key]) for c in cands]
        sc = ax.scatter(xs, [c["top1"] for c in cands], c=[v if v is not None else 0 for v in lat], cmap="viridis",
                        s=18, alpha=0.8)
        fx = [(c[key] / 1024 if key == "size_bytes" else c[key]) for c in front]
        ax.scatter(fx, [c["top1"] for c in front], facecolors="none", edgecolors="#cc3311", s=60,
                   label="frontier (accuracy, size, latency)")
        pts = sorted(zip(xs, [c["top1"] for c in cands]), key=lambda p: (p[0], -p[1]))
        stair, best = [], -1.0
        for px, py in pts:  # this panel's own 2-D frontier: best accuracy at or below each cost
            if py > best:
                stair.append((px, py))
                best = py
        ax.step([p[0] for p in stair], [p[1] for p in stair], where="post", color="#cc3311", lw=1.0)
        ax.axhline(s["fp32"]["holdout_top1"], color="green", ls=":", lw=1, label="FP32")
        if s["budget"]["max_drop"] is not None:
            ax.axhline(s["fp32"]["holdout_top1"] - s["budget"]["max_drop"], color="black", ls="--", lw=1,
                       label="accuracy budget")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (held-out)")
        ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(sc, ax=axes[1], label="latency ms")
    axes[0].set_title(f"mixed {s['low']} / {s['high']}: every evaluated plan")
    return fig


def write_mixed_report(s: dict, path: Path) -> Path:
    m, u, f = s["mixed"], s["uniform"], s["fp32"]
    rows = [["FP32", f["top1"], f["onnx_top1"], f["holdout_top1"], f["size_bytes"], "", f["latency_ms"], 1.0],
            [f"uniform {s['low']}", u["top1"], u["onnx_top1"], u["holdout_top1"], u["onnx_bytes"], u["size_bytes"],
             u["latency_ms"]["batch1"], u["latency_over_fp32"]["batch1"]],
            ["mixed (chosen plan)", m["top1"], s["onnx_mixed"]["top1"], m["holdout_top1"], m["onnx_bytes"],
             m["size_bytes"], m["latency_ms"]["batch1"], m["latency_over_fp32"]["batch1"]]]
    steps = [[c["label"], "yes" if c["accepted"] else "no", c["top1"], c["sqnr_db"], c["size_bytes"],
              c["high_precision_mac_fraction"]] for c in s["search"]["steps"]]
    front = [[c["label"], len(c["high_layers"]), c["top1"], c["size_bytes"], c["latency_ms"], c["latency_over_fp32"]]
             for c in s["frontier"]]
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeslim mixed</title>", STYLE,
             f"<h1>edgeslim mixed: {html.escape(str(s['model']))}</h1>",
             f"<p><b>{'Budget met' if s['met'] else 'Budget NOT met'}</b>: {html.escape(s['reason'])}. "
             f"High-precision layers ({s['high']}): {html.escape(', '.join(m['high_precision_layers']) or 'none')} "
             f"= {m['high_precision_mac_fraction']:.1%} of MACs, {m['high_precision_param_fraction']:.1%} of weights. "
             f"Search {s['search']['seconds']:.1f} s (sensitivity {s['search']['sensitivity_seconds']:.1f} s).</p>",
             _table(rows, ["model", "test top-1 (PyTorch)", "test top-1 (onnxruntime)", "held-out top-1", "ONNX bytes",
                           "stored parameter bytes", "latency ms b1", "x FP32"]),
             "<h2>Accuracy vs size vs latency</h2>", frontier_plot(s),
             _table(front, ["frontier plan", "high-precision ops", "held-out top-1", "bytes", "latency ms", "x FP32"]),
             "<h2>Search steps (greedy by sensitivity, verified)</h2>",
             _table(steps, ["step", "kept", "held-out top-1", "SQNR dB", "bytes", "high MAC fraction"])]
    return _write(parts, path)


def _write(parts: list[str], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
