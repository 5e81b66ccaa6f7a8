"""HTML reports of ``edgeslim sensitivity`` (the per-layer sensitivity figure, the backbone / neck / head group table)
and ``edgeslim mixed`` (the search steps and the quality / size / latency frontier), for every task's metric
(top-1 on labelled data, SQNR in dB against the FP32 model without labels)."""

from __future__ import annotations

import html
from pathlib import Path

from .html import plt, png, size, table, wide
from .results import MixedResult

__all__ = ["STYLE", "sensitivity_plot", "metric_label", "sensitivity_figure", "sensitivity_table", "best_tradeoffs",
           "group_section", "write_sensitivity_report", "frontier_plot", "frontier_figure", "write_mixed_report"]


STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right} th{background:#eee}"
         ".wide{overflow-x:auto;max-width:100%} img{max-width:100%;height:auto} tr.best td{background:#e2f5e2}</style>")


def sensitivity_plot(sens: dict) -> str:
    return png(sensitivity_figure(sens))


def metric_label(metric: dict | None) -> str:
    """'top-1' / 'SQNR dB' for a summary's ``metric`` (older summaries: top-1)."""
    if not metric:
        return "top-1"
    return f"{metric['name']} dB" if metric.get("unit") == "dB" else metric["name"]


def _finite(values) -> list[float]:
    return [v for v in values if v is not None]


def sensitivity_figure(sens: dict):
    """One bar per layer / op: the score with only it kept high (the per-layer sensitivity figure) and with only
    it quantized."""
    rows, label = sens["rows"], metric_label(sens.get("metric"))
    fraction = label == "top-1"
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.3 * len(rows)), 6.4), sharex=True)
    x = range(len(rows))
    fp32 = sens["fp32_score"]
    for ax, sweep, ref, ref_label, color in (
            (axes[0], "keep_high", sens["uniform"]["score"], f"all {sens['low']}", "#4477aa"),
            (axes[1], "only_quantized", fp32, f"all {sens['high']}", "#cc6677")):
        if not all(sweep in r for r in rows):
            ax.set_visible(False)
            continue
        values = [r[sweep]["score"] for r in rows]
        shown = _finite(values)
        ax.bar(x, [v if v is not None else 0.0 for v in values],
               color=[color if r["kind"] == "layer" else "#999999" for r in rows])
        if ref is not None:
            ax.axhline(ref, color="black", lw=1, ls="--", label=ref_label)
        if fp32 is not None:
            ax.axhline(fp32, color="green", lw=1, ls=":", label="FP32")
        if shown:
            lo, hi = min(shown + _finite([ref])), max(shown + _finite([fp32]))
            pad = 0.03 if fraction else max(1.0, 0.1 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad) if fraction else lo - pad, min(1.0, hi + 0.02) if fraction else hi + pad)
        ax.set_ylabel(f"{label} (held-out)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title(f"one op kept at {sens['high']}, the rest {sens['low']} (grey: adds / pooling)")
    axes[1].set_title(f"one op at {sens['low']}, the rest {sens['high']}")
    axes[1].set_xticks(list(x), [r["name"] for r in rows], rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def sensitivity_table(sens: dict) -> str:
    rows = []
    for r in sens["rows"]:
        kh, oq = r.get("keep_high", {}), r.get("only_quantized", {})
        rows.append([r["name"], r["kind"], r["macs"], r["params"], kh.get("score", ""), kh.get("delta", ""),
                     kh.get("sqnr_db", ""), oq.get("score", ""), oq.get("delta", ""), oq.get("sqnr_db", "")])
    label = metric_label(sens.get("metric"))
    return wide(table(rows, ["op", "kind", "MACs", "params", f"keep-high {label}", "gain", "output SQNR dB",
                             f"only-quantized {label}", "change vs all high", "output SQNR dB"]))


def best_tradeoffs(rows: list[dict]) -> set[int]:
    """Indices of the rows no other row beats on both size and score (the trade-off frontier)."""
    def score(r):
        return float("inf") if r["score"] is None else r["score"]
    return {i for i, r in enumerate(rows)
            if not any(o["weight_bytes"] <= r["weight_bytes"] and score(o) >= score(r)
                       and (o["weight_bytes"] < r["weight_bytes"] or score(o) > score(r)) for o in rows)}


def group_section(g: dict, label: str = "top-1") -> list[str]:
    """Every combination, smallest first; the rows on the size / score frontier (best trade-offs) marked."""
    names = list(g["groups"])
    ordered = sorted(g["rows"], key=lambda r: r["weight_bytes"])
    best = best_tradeoffs(ordered)
    head = ["method", *names, "weight size", "ONNX size", label, "latency ms (batch 1)", "latency vs FP32", "FPS",
            "best trade-off"]
    fp32_ms = g.get("fp32_latency_ms")
    body = [["FP32 (ONNX)", *["32"] * len(names), size(g["fp32_bytes"]), "", g["fp32_score"], fp32_ms, "1.00x",
             1000.0 / fp32_ms if fp32_ms else "", ""]]
    for i, r in enumerate(ordered):
        body.append(["partial" if r["quantized"] and len(r["quantized"]) < len(names) else
                     ("all quantized" if r["quantized"] else f"all {g['high']}"),
                     *[r["precision"][n] for n in names], size(r["weight_bytes"]), size(r["onnx_bytes"]), r["score"],
                     r["latency_ms"], "" if r["latency_over_fp32"] is None else f"{r['latency_over_fp32']:.2f}x",
                     r["fps"], "yes" if i in best else ""])
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    mark = ' class="best"'
    trs = "".join(f"<tr{mark if row[-1] == 'yes' else ''}>"
                  + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in body)
    return [f"<h2>Groups: every combination at {html.escape(g['high'])} / {html.escape(g['low'])}</h2>",
            "<p>Groups: " + html.escape("; ".join(f"{k} = {'|'.join(v)}" for k, v in g["groups"].items())) +
            f". {html.escape(label)} of the exported ONNX model in onnxruntime on the test set; latency batch 1, "
            "paired with FP32 in the same run (latency vs FP32: INT8 time / FP32 time, lower is faster). Rows are "
            "sorted by weight size; a best trade-off (green) is a row no other row beats on both size and "
            f"{html.escape(label)}.</p>",
            wide(f"<table><tr>{cells}</tr>{trs}</table>")]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _num(v, fmt: str = ".4f") -> str:
    return "exact (inf)" if v is None else format(v, fmt)


def write_sensitivity_report(s: dict, path: Path) -> Path:
    sens = s["sensitivity"]
    label = metric_label(sens.get("metric"))
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeslim sensitivity</title>", STYLE,
             f"<h1>edgeslim sensitivity: {html.escape(str(s['model']))}</h1>",
             f"<p>Task {html.escape(str(s.get('task', 'classify')))}, scored by {html.escape(label)}. "
             f"Low precision {html.escape(sens['low'] if isinstance(sens['low'], str) else str(sens['low']))}, "
             f"high {html.escape(str(sens['high']))}; {sens['images']} {sens.get('inputs', 'held-out')} inputs (disjoint from the "
             f"{s['images']['calibration']} calibration inputs). FP32 {html.escape(label)} {_num(sens['fp32_score'])}, "
             f"uniformly quantized {_num(sens['uniform']['score'])}. Wall time: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in sens["seconds"].items()) + f" (total {sens['total_seconds']:.1f} s; "
             "one calibration, FP32 outputs and unchanged activations reused).</p>",
             sensitivity_plot(sens), sensitivity_table(sens)]
    if "groups" in s:
        parts += group_section(s["groups"], label)
    return _write(parts, path)


def frontier_plot(s) -> str:
    return png(frontier_figure(s))


def frontier_figure(s):
    """Every evaluated plan: held-out score against stored size and against onnxruntime latency; ``s``: a
    ``MixedResult`` or its summary dict."""
    r = MixedResult.of(s)
    cands, front = r.candidates, r.frontier
    label = metric_label(r.metric)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lat = [c["latency_ms"] for c in cands]
    for ax, key, xlabel in ((axes[0], "size_bytes", "stored parameters (KiB)"),
                            (axes[1], "latency_ms", "latency ms (batch 1)")):
        xs = [(c[key] / 1024 if key == "size_bytes" else c[key]) for c in cands]
        ys = [c["score"] for c in cands]
        sc = ax.scatter(xs, ys, c=[v if v is not None else 0 for v in lat], cmap="viridis", s=18, alpha=0.8)
        fx = [(c[key] / 1024 if key == "size_bytes" else c[key]) for c in front]
        ax.scatter(fx, [c["score"] for c in front], facecolors="none", edgecolors="#cc3311", s=60,
                   label="frontier (quality, size, latency)")
        pts = sorted((p for p in zip(xs, ys) if p[1] is not None and p[0] is not None), key=lambda p: (p[0], -p[1]))
        stair, best = [], -float("inf")
        for px, py in pts:  # this panel's own 2-D frontier: best score at or below each cost
            if py > best:
                stair.append((px, py))
                best = py
        ax.step([p[0] for p in stair], [p[1] for p in stair], where="post", color="#cc3311", lw=1.0)
        fp32 = r.fp32.holdout_score
        if fp32 is not None:
            ax.axhline(fp32, color="green", ls=":", lw=1, label="FP32")
        floor = _floor(r)
        if floor is not None:
            ax.axhline(floor, color="black", ls="--", lw=1, label="budget")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} (held-out)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)  # below the axes, off the points
    fig.colorbar(sc, ax=axes[1], label="latency ms")
    axes[0].set_title(f"mixed {r.low} / {r.high}: every evaluated plan")
    fig.tight_layout()
    return fig


def _floor(r: MixedResult) -> float | None:
    """The held-out score the budget asks for (the larger of FP32 - max_drop and the floor), in score units."""
    b, per_unit, fp32 = r.budget, (r.metric or {}).get("per_unit", 100.0), r.fp32.holdout_score
    floors = [v for v in ((fp32 - b["max_drop"] / per_unit) if b.get("max_drop") is not None and fp32 is not None
                          else None, b.get("min_score")) if v is not None]
    return max(floors) if floors else None


def write_mixed_report(s, path: Path) -> Path:
    """``report.html`` of ``mixed``: ``s`` a ``MixedResult`` or its summary dict."""
    r = MixedResult.of(s)
    m, u, f = r.mixed, r.uniform, r.fp32
    label = metric_label(r.metric)
    rows = [["FP32", f.score, f.onnx_score, f.holdout_score, size(f.size_bytes), "", f.latency_ms, 1.0],
            [f"uniform {r.low}", u.score, u.onnx_score, u.holdout_score, size(u.onnx_bytes),
             size(u.size_bytes), u.latency_ms["batch1"], u.latency_over_fp32["batch1"]],
            ["mixed (chosen plan)", m.score, r.onnx_mixed["score"], m.holdout_score, size(m.onnx_bytes),
             size(m.size_bytes), m.latency_ms["batch1"], m.latency_over_fp32["batch1"]]]
    steps = [[c["label"], "yes" if c["accepted"] else "no", c["score"], c["sqnr_db"], size(c["size_bytes"]),
              c["high_precision_mac_fraction"]] for c in r.search["steps"]]
    front = [[c["label"], len(c["high_layers"]), c["score"], size(c["size_bytes"]), c["latency_ms"], c["latency_over_fp32"]]
             for c in r.frontier]
    parts = ["<!doctype html><meta charset='utf-8'><title>edgeslim mixed</title>", STYLE,
             f"<h1>edgeslim mixed: {html.escape(str(r.model))}</h1>",
             f"<p>Task {html.escape(str(r.task))}, scored by {html.escape(label)} "
             "(an empty cell: identical to FP32).</p>",
             f"<p><b>{'Budget met' if r.met else 'Budget NOT met'}</b>: {html.escape(r.reason)}. "
             f"High-precision layers ({r.high}): {html.escape(', '.join(m.high_precision_layers) or 'none')} "
             f"= {m.high_precision_mac_fraction:.1%} of MACs, {m.high_precision_param_fraction:.1%} of weights. "
             f"Search {r.search['seconds']:.1f} s (sensitivity {r.search['sensitivity_seconds']:.1f} s).</p>",
             wide(table(rows, ["model", f"test {label} (PyTorch)", f"test {label} (onnxruntime)", f"held-out {label}",
                               "ONNX size", "stored parameters", "latency ms b1", "x FP32"])),
             "<h2>Quality vs size vs latency</h2>", frontier_plot(r),
             wide(table(front, ["frontier plan", "high-precision ops", f"held-out {label}", "stored parameters", "latency ms",
                                "x FP32"])),
             "<h2>Search steps (greedy by sensitivity, verified)</h2>",
             wide(table(steps, ["step", "kept", f"held-out {label}", "output SQNR dB", "stored parameters", "high MAC fraction"]))]
    return _write(parts, path)


def _write(parts: list[str], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
