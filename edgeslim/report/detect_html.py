"""The ``report.html`` of ``quantize --task detect``: mAP / P / R / size / latency per model, AP per class for the
FP32 and INT8 files, and the INT8 file's per-class confusion matrix (not just tp / fp / fn)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from .html import STYLE, plt, png, preprocessing_html, provenance_html, size, table, wide
from .results import DetectResult

__all__ = ["model_rows", "class_rows", "confusion_figure", "write_detect_report"]


def _f(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def model_rows(r: DetectResult) -> list[list]:
    """One row per scored model: mAP, P / R / F1, its change vs the FP32 ONNX file, size, latency, speed-up."""
    lat, sz = r.latency_ms, r.size_bytes
    base = r.onnx_fp32.map50_95
    n_sim = r.images["test"] if r.quantized.images is None else r.quantized.images
    rows = []
    for label, key, file in ((f"FP32 (PyTorch, {n_sim} images)", "fp32", None),
                             (f"quantized (fake-quant, PyTorch, {n_sim} images)", "quantized", None),
                             ("FP32 ONNX (onnxruntime)", "onnx_fp32", "fp32"), ("INT8 ONNX (onnxruntime)", "onnx_int8", "int8"),
                             ("integer engine (numpy)", "engine", None)):
        m = getattr(r, key)
        if m is None:
            continue
        ms = getattr(lat, file) if file else None
        delta = f"{100 * (m.map50_95 - base):+.2f}" if file else ""
        speed = f"{lat.fp32 / ms:.2f}x" if file else ""
        rows.append([label, _f(m.map50), _f(m.map50_95), delta, _f(m.precision), _f(m.recall), _f(m.f1),
                     size(getattr(sz, file)) if file else "", f"{ms:.2f}" if file else "", speed])
    return rows


def class_rows(r: DetectResult, names: list[str]) -> list[list]:
    """Per class with ground truth in the test set: boxes, AP@.5 / AP@.5:.95 of FP32 and INT8 ONNX, the change, and
    the INT8 file's tp / fp / fn, precision, recall (at the confusion-matrix score threshold). Worst change first."""
    f, q = r.onnx_fp32.per_class, r.onnx_int8.per_class
    if not f or not q:
        return []
    rows = []
    for c, n in enumerate(q["num_gt"]):
        if n == 0 and q["tp"][c] + q["fp"][c] == 0:
            continue
        change = q["ap50_95"][c] - f["ap50_95"][c] if n else float("nan")
        rows.append((change, [names[c] if c < len(names) else str(c), n, _f(f["ap50"][c]), _f(q["ap50"][c]),
                              _f(f["ap50_95"][c]), _f(q["ap50_95"][c]),
                              "" if math.isnan(change) else f"{100 * change:+.2f}",
                              q["tp"][c], q["fp"][c], q["fn"][c], _f(q["precision"][c]), _f(q["recall"][c])]))
    rows.sort(key=lambda r: (math.isnan(r[0]), r[0]))
    return [r for _, r in rows]


def confusion_figure(matrix: list[list[int]], names: list[str], max_classes: int = 20) -> str:
    """The INT8 file's confusion matrix over the classes that occur (at most ``max_classes``, most frequent), plus
    background: rows predicted, columns true; the last row is missed objects, the last column false detections."""
    m = np.asarray(matrix)
    nc = m.shape[0] - 1
    count = m[:nc, :].sum(axis=1) + m[:, :nc].sum(axis=0)
    keep = [int(c) for c in np.argsort(-count, kind="stable")[:max_classes] if count[c] > 0]
    if not keep:
        return "<p>No detections and no ground truth above the score threshold: no confusion matrix.</p>"
    keep.sort()
    idx = keep + [nc]
    sub = m[np.ix_(idx, idx)]
    labels = [names[c] if c < len(names) else str(c) for c in keep] + ["background"]
    k = len(idx)
    fig, ax = plt.subplots(figsize=(min(10, 2 + 0.45 * k), min(9, 1.6 + 0.4 * k)))
    im = ax.imshow(sub, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("true class")
    ax.set_ylabel("predicted class")
    for i in range(k):
        for j in range(k):
            if sub[i, j]:
                ax.text(j, i, str(int(sub[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if sub[i, j] > sub.max() / 2 else "black")
    ax.set_title("INT8 ONNX: confusion matrix per class")
    fig.colorbar(im, ax=ax, fraction=0.046)
    shown = "" if len(keep) == int((count > 0).sum()) else f" (the {len(keep)} most frequent classes)"
    return png(fig) + (f"<p>Rows: predicted class; columns: true class{shown}. The background row counts objects "
                       "missed, the background column detections with no object; off-diagonal cells are objects found "
                       "at the right place with the wrong class.</p>")


def write_detect_report(s, names: list[str], path: Path) -> Path:
    """``report.html`` of ``quantize --task detect``: ``s`` a ``DetectResult`` or its summary; ``names``: the class
    names."""
    r = DetectResult.of(s)
    cfg, o, images = r.config, r.detect_options, r.images
    rows = class_rows(r, names)
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>edgeslim quantize (detect): {html.escape(str(r.model))}</title>",
        STYLE,
        f"<h1>edgeslim quantize (detect): {html.escape(str(r.model))}</h1>",
        f"<p>W{cfg['w_bits']}A{cfg['a_bits']}, {cfg['granularity']} weights, calibrator {cfg['calibrator']}; "
        f"{images['calibration']} calibration / {images['test']} test images ({images['test_boxes']} "
        f"boxes) at {images['imgsz']} pixels; quantized in {r.time_to_quantize_s:.1f} s.</p>",
        preprocessing_html(r.preprocessing) if r.has("preprocessing") else "",
        "<h2>mAP, size, latency</h2>",
        f"<p>mAP change in points against the FP32 ONNX file; both files run in onnxruntime on every test image. "
        f"Precision / recall / F1 count detections scored above {o['cm_conf']} matched at IoU {o['cm_iou']}. "
        f"Latency batch 1, {r.latency_ms.threads} thread(s), paired with FP32.</p>",
        wide(table(model_rows(r), ["model", "mAP@.5", "mAP@.5:.95", "change (points)", "precision", "recall", "F1",
                                   "ONNX size", "latency ms", "speed-up vs FP32"])),
        "<h2>Per class</h2>",
        "<p>Classes of the test set, largest mAP@.5:.95 loss first; tp / fp / fn, precision and recall of the INT8 "
        "file at the confusion-matrix threshold.</p>" if rows else "<p>No per-class figures in this summary.</p>",
        wide(table(rows, ["class", "boxes", "AP@.5 FP32", "AP@.5 INT8", "AP@.5:.95 FP32", "AP@.5:.95 INT8",
                          "change (points)", "tp", "fp", "fn", "precision", "recall"])) if rows else "",
    ]
    if r.onnx_int8.confusion_matrix is not None:
        parts += ["<h2>Confusion matrix per class (INT8 ONNX)</h2>",
                  confusion_figure(r.onnx_int8.confusion_matrix, names)]
    parts += provenance_html(r.provenance)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
