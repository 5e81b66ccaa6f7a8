"""Detection metrics (numpy): IoU, greedy NMS, COCO mAP, confusion matrix and P/R/F1.

Boxes are ``x1, y1, x2, y2`` pixels (any frame, as long as detections and targets share it:
IoU is unchanged by the letterbox's uniform scale and shift). Detections are per image
``(k, 6)`` arrays ``[x1, y1, x2, y2, score, cls]`` (what :func:`nms` returns); targets are per
image ``(boxes (k, 4), classes (k,))`` pairs (``edgeslim.data.detection.Target``).

:func:`evaluate_map` follows pycocotools' ``COCOeval`` for ``iouType='bbox'`` with area range
'all' and ``maxDets=100`` (stats[0] and stats[1]): Lin et al., "Microsoft COCO: Common Objects
in Context", ECCV 2014, and ``cocoeval.py`` (evaluateImg / accumulate). The tests check it
against pycocotools on the same detections.

Example::

    dets = nms(model_output, conf_thres=0.001, iou_thres=0.6, box_format="cxcywh")
    m = evaluate_map(dets, targets, num_classes=80)      # m["map50_95"], m["map50"]
    prf = precision_recall_f1(confusion_matrix(dets, targets, num_classes=80))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeslim.errors import EdgeslimError

__all__ = ["IOU_THRESHOLDS", "RECALL_POINTS", "COCO_MAX_DETS", "BOX_FORMATS", "box_iou", "cxcywh_to_xyxy",
           "from_decoded", "DecodedLayout", "greedy_nms", "nms", "nms_rows", "evaluate_map", "confusion_matrix", "precision_recall_f1"]


# The exact arrays COCOeval builds (same linspace calls), so thresholds compare bit for bit.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_MAX_DETS = 100
_MAX_CANDIDATES = 30000  # boxes kept (by score) before NMS: bounds the cost on untrained models
BOX_FORMATS = ("xyxy", "cxcywh")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` (N, 4) and ``b`` (M, 4), xyxy -> (N, M) float64.

    Intersection over union without COCO's old ``+1`` pixel convention (pycocotools' ``bbIou``);
    a pair whose union is empty (two degenerate boxes) has IoU 0.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``cx, cy, w, h`` (the YOLO head's layout) -> ``x1, y1, x2, y2`` along the last axis."""
    b = np.asarray(boxes)
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., 0:2] - half, b[..., 0:2] + half], axis=-1)


def from_decoded(pred: np.ndarray) -> np.ndarray:
    """A decoded-output file's ``(N, A, 5 + nc)`` (cx, cy, w, h, objectness, class probabilities; the layout
    YOLOv5's exporter writes) -> ``(N, A, 4 + nc)`` as the numpy decoders give it: x1, y1, x2, y2, obj * cls."""
    p = np.asarray(pred, dtype=np.float32)
    return np.concatenate([cxcywh_to_xyxy(p[..., :4]), p[..., 4:5] * p[..., 5:]], axis=-1)


class DecodedLayout:
    """The 'decoder' of a file whose graph already decodes: its one output through ``from_decoded``."""

    def __call__(self, outputs) -> np.ndarray:
        if len(outputs) != 1:
            raise EdgeslimError(f"a decoded-output model has one output, got {len(outputs)}")
        return from_decoded(outputs[0])


# candidates up to which greedy NMS reads one IoU matrix; above it, the boxes in score order go this many at a time
# (about a fifth of the candidates survive NMS at the mAP settings: the kept-by-block rows cost less than N^2)
_NMS_MATRIX_MAX = _NMS_BLOCK = 256


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float) -> np.ndarray:
    """Indices kept by greedy NMS: take the best box, drop those overlapping it by IoU > thres, repeat.

    Up to ``_NMS_MATRIX_MAX`` boxes the IoUs come from one ``box_iou(boxes, boxes)`` (each entry the same
    float64 arithmetic as one row of it, so the same boxes are kept) and the loop only ORs suppression masks;
    above it, the boxes in score order go in blocks of ``_NMS_BLOCK`` (``_blocked_nms``)."""
    order = np.argsort(-scores, kind="stable")
    if len(order) <= _NMS_MATRIX_MAX:
        over = box_iou(boxes, boxes) > iou_thres
        suppressed = np.zeros(len(order), bool)
        keep = []
        for i in order:
            if not suppressed[i]:
                keep.append(i)
                suppressed |= over[i]
        return np.asarray(keep, np.int64)
    return order[_blocked_nms(boxes[order], iou_thres)]


def _blocked_nms(boxes: np.ndarray, iou_thres: float) -> np.ndarray:
    """Greedy NMS of boxes already in score order, a block at a time: a block's boxes are first suppressed by the
    boxes kept in earlier blocks (one ``box_iou(kept, block)``), then greedily among themselves (one
    ``box_iou(block, block)``). A box is dropped exactly when an earlier kept box overlaps it by IoU > thres, as in
    the plain loop; each IoU entry is the same float64 arithmetic (``box_iou`` is elementwise and symmetric)."""
    kept: list[int] = []
    for a in range(0, len(boxes), _NMS_BLOCK):
        block = boxes[a:a + _NMS_BLOCK]
        suppressed = (box_iou(boxes[kept], block) > iou_thres).any(axis=0)
        over = box_iou(block, block) > iou_thres
        for j in range(len(block)):
            if not suppressed[j]:
                kept.append(a + j)
                suppressed |= over[j]
    return np.asarray(kept, np.int64)


def nms(
    pred: np.ndarray,
    *,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    box_format: str = "xyxy",
) -> list[np.ndarray]:
    """Per-image class-aware NMS of raw head outputs -> list of (k, 6) ``[x1,y1,x2,y2,score,cls]``.

    ``pred`` is (N, A, 4 + nc): A boxes per image (``box_format`` 'xyxy', or 'cxcywh' for YOLO
    heads), then per-class scores already multiplied by objectness. A box is a candidate for
    its best class (or, with ``multi_label``, for every class) when the score is > ``conf_thres``;
    NMS runs per class (``agnostic``: over all classes together), suppressing IoU > ``iou_thres``.
    Output rows are sorted by score (descending, stable), at most ``max_det`` per image, float32.
    The defaults are the usual mAP-evaluation settings (low threshold, ~full recall).
    """
    if box_format not in BOX_FORMATS:
        raise EdgeslimError(f"box_format {box_format!r} is not one of {', '.join(BOX_FORMATS)}")
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred[None]
    if pred.ndim != 3 or pred.shape[-1] < 5:
        raise EdgeslimError(f"predictions have shape {pred.shape}: pass (N, A, 4 + classes)")
    return [nms_rows(x[:, :4], x[:, 4:], conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                     multi_label=multi_label, agnostic=agnostic, box_format=box_format) for x in pred]


def nms_rows(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    multi_label: bool = False,
    agnostic: bool = False,
    box_format: str = "xyxy",
) -> np.ndarray:
    """One image of :func:`nms`: boxes (A, 4) and per-class scores (A, nc) -> (k, 6) float32.

    Rows that cannot be candidates may be left out beforehand (the rest kept in their order): the result is the
    same, ties included. The best class is found on the scores as given (float32 -> float64 is exact: the same
    order, ties and NaN); only the chosen scores and the candidates' boxes are widened to float64."""
    scores = np.asarray(scores)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    if multi_label:
        wide = scores.astype(np.float64)
        ai, ci = np.nonzero(wide > conf_thres)
        s = wide[ai, ci]
    else:
        ci = scores.argmax(axis=1)
        s = scores[np.arange(len(scores)), ci].astype(np.float64)
        ai = np.nonzero(s > conf_thres)[0]
        ci, s = ci[ai], s[ai]
    if s.size > _MAX_CANDIDATES:
        top = np.argsort(-s, kind="stable")[:_MAX_CANDIDATES]
        ai, ci, s = ai[top], ci[top], s[top]
    b = np.asarray(boxes)[ai].astype(np.float64)
    if box_format == "cxcywh":
        b = cxcywh_to_xyxy(b)
    if agnostic:
        keep = greedy_nms(b, s, iou_thres)
    else:
        keep = np.concatenate(
            [np.nonzero(ci == c)[0][greedy_nms(b[ci == c], s[ci == c], iou_thres)] for c in np.unique(ci)]
            or [np.zeros(0, np.int64)]
        )
    keep = keep[np.argsort(-s[keep], kind="stable")][:max_det]
    return np.concatenate([b[keep], s[keep, None], ci[keep, None]], axis=1).astype(np.float32)


def _check(detections: Sequence, targets: Sequence, num_classes: int) -> list[tuple]:
    if len(detections) != len(targets):
        raise EdgeslimError(
            f"{len(detections)} detection arrays for {len(targets)} images: pass one (k, 6) array per image"
        )
    pairs = []
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        det = np.asarray(det, np.float64).reshape(-1, 6)
        gb = np.asarray(tgt[0], np.float64).reshape(-1, 4)
        gc = np.asarray(tgt[1]).reshape(-1).astype(np.int64)
        if len(gb) != len(gc):
            raise EdgeslimError(f"image {i} has {len(gb)} target boxes but {len(gc)} classes: pass one class per box")
        dc = det[:, 5].astype(np.int64)
        for what, c in (("detection", dc), ("target", gc)):
            if c.size and (c.min() < 0 or c.max() >= num_classes):
                raise EdgeslimError(
                    f"image {i} has a {what} class id {int(c.max())} outside 0..{num_classes - 1}: check num_classes"
                )
        pairs.append((det[:, :4], det[:, 4], dc, gb, gc))
    return pairs


def evaluate_map(detections: Sequence[np.ndarray], targets: Sequence, *, num_classes: int) -> dict:
    """COCO box mAP: mean over IoU 0.50:0.05:0.95 and over classes with ground truth.

    Per image and class the top 100 detections by score are kept (COCO's ``maxDets`` applies
    per image *and* category). For each IoU threshold, detections in score order (stable) are
    matched to the unmatched ground truth of highest IoU >= the threshold (ties go to the later
    box, as in COCOeval). Over all images, sorted by score: cumulative TP/FP give precision and
    recall; precision is made non-increasing (its envelope) and read at 101 recall points
    0:0.01:1 (0 past the last recall reached). No crowd boxes, no area ranges.

    Returns ``map50``, ``map50_95``, ``per_class_ap50`` / ``per_class_ap`` (NaN for classes
    without ground truth), ``per_class_num_gt``, ``num_images``, ``num_gt``.
    """
    pairs = _check(detections, targets, num_classes)
    t_count = len(IOU_THRESHOLDS)
    # Per class: lists over images of (scores, tp matrix T x d) in image order, like accumulate().
    scores: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    tps: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    n_gt = np.zeros(num_classes, np.int64)
    for db, ds, dc, gb, gc in pairs:
        for c in np.union1d(np.unique(dc), np.unique(gc)):
            g = gb[gc == c]
            d_idx = np.nonzero(dc == c)[0]
            d_idx = d_idx[np.argsort(-ds[d_idx], kind="mergesort")][:COCO_MAX_DETS]
            n_gt[c] += len(g)
            tp = np.zeros((t_count, len(d_idx)), bool)
            if len(g) and len(d_idx):
                ious = box_iou(db[d_idx], g)
                limits = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
                taken = np.zeros((t_count, len(g)), bool)  # all thresholds at once, one detection at a time
                rows = np.arange(t_count)
                for k in range(len(d_idx)):
                    cand = np.where(taken, -1.0, ious[k])
                    best = len(g) - 1 - np.argmax(cand[:, ::-1], axis=1)  # the last among equal maxima
                    hit = cand[rows, best] >= limits
                    taken[rows[hit], best[hit]] = True
                    tp[:, k] = hit
            scores[c].append(ds[d_idx])
            tps[c].append(tp)
    ap = np.full((num_classes, t_count), np.nan)
    for c in range(num_classes):
        if n_gt[c] == 0:
            continue
        s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
        order = np.argsort(-s, kind="mergesort")
        tp_all = np.concatenate(tps[c], axis=1)[:, order] if tps[c] else np.zeros((t_count, 0), bool)
        tp_sum = np.cumsum(tp_all, axis=1).astype(dtype=float)
        fp_sum = np.cumsum(~tp_all, axis=1).astype(dtype=float)
        for t in range(t_count):
            ap[c, t] = _ap_101(tp_sum[t], fp_sum[t], int(n_gt[c]))
    has = n_gt > 0
    ap_mean = ap.mean(axis=1)
    return {
        "map50": float(np.mean(ap[has, 0])) if has.any() else float("nan"),
        "map50_95": float(np.mean(ap_mean[has])) if has.any() else float("nan"),
        "per_class_ap50": [float(v) for v in ap[:, 0]],
        "per_class_ap": [float(v) for v in ap_mean],
        "per_class_num_gt": [int(v) for v in n_gt],
        "num_images": len(pairs),
        "num_gt": int(n_gt.sum()),
    }


def _ap_101(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP from cumulative TP/FP counts (COCOeval.accumulate, one cell)."""
    rc = tp / n_gt
    pr = tp / (fp + tp + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1])[::-1]  # envelope: best precision at any higher recall
    inds = np.searchsorted(rc, RECALL_POINTS, side="left")
    q = np.where(inds < len(pr), pr[np.minimum(inds, len(pr) - 1)] if len(pr) else 0.0, 0.0)
    return float(np.mean(q))


def confusion_matrix(
    detections: Sequence[np.ndarray],
    targets: Sequence,
    *,
    num_classes: int,
    iou_thres: float = 0.5,
    conf_thres: float = 0.25,
) -> np.ndarray:
    """(nc+1, nc+1) int64 counts, ``m[predicted, true]``; index ``nc`` is background.

    Detections with score > ``conf_thres`` are matched one to one with ground truth, whatever
    their classes, highest IoU first among pairs with IoU >= ``iou_thres``. A matched pair adds
    to ``m[det_cls, gt_cls]`` (off-diagonal: right place, wrong class); an unmatched ground
    truth to ``m[nc, gt_cls]`` (last row: missed); an unmatched detection to ``m[det_cls, nc]``
    (last column: false positive). ``m[nc, nc]`` stays 0: detection has no true negatives.
    Jang et al. scores its yolov3-tiny variants this way, detected objects against labels at IoU 0.5.
    """
    m = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for db, ds, dc, gb, gc in _check(detections, targets, num_classes):
        keep = ds > conf_thres
        db, dc = db[keep], dc[keep]
        iou = box_iou(gb, db)
        gi, di = np.nonzero(iou >= iou_thres)
        used_g, used_d = np.zeros(len(gb), bool), np.zeros(len(db), bool)
        for k in np.argsort(-iou[gi, di], kind="stable"):
            g, d = gi[k], di[k]
            if not used_g[g] and not used_d[d]:
                used_g[g] = used_d[d] = True
                m[dc[d], gc[g]] += 1
        np.add.at(m, (num_classes, gc[~used_g]), 1)
        np.add.at(m, (dc[~used_d], num_classes), 1)
    return m


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def precision_recall_f1(matrix: np.ndarray) -> dict:
    """Per-class, micro and macro precision / recall / F1 from :func:`confusion_matrix`.

    For class c: TP = m[c, c]; FP = row c minus TP (predicted c: another class or background);
    FN = column c minus TP (true c: predicted as another class or missed). P = TP/(TP+FP),
    R = TP/(TP+FN), F1 = 2PR/(P+R), with 0/0 read as 0. Classes with no TP, FP or FN are NaN
    and left out of the macro means. Micro sums TP/FP/FN over classes. ``accuracy`` is
    TP/(TP+FP+FN): Jang et al. reports a single "accuracy" from its confusion matrix without
    defining it, and with no true negatives in detection this is the fraction of correct
    outcomes among all of them.
    """
    m = np.asarray(matrix, np.int64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise EdgeslimError(f"confusion matrix has shape {m.shape}: pass the (nc+1, nc+1) matrix of confusion_matrix")
    nc = m.shape[0] - 1
    tp = np.diag(m)[:nc].astype(np.int64)
    fp = m[:nc, :].sum(axis=1) - tp
    fn = m[:, :nc].sum(axis=0) - tp
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * p * r, p + r)
    present = (tp + fp + fn) > 0

    def per_class(v: np.ndarray) -> list[float]:
        return [float(x) if ok else float("nan") for x, ok in zip(v, present)]

    def macro(v: np.ndarray) -> float:
        return float(np.mean(v[present])) if present.any() else float("nan")

    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    mp, mr = float(_ratio(TP, TP + FP)), float(_ratio(TP, TP + FN))
    return {
        "per_class": {
            "tp": [int(v) for v in tp], "fp": [int(v) for v in fp], "fn": [int(v) for v in fn],
            "precision": per_class(p), "recall": per_class(r), "f1": per_class(f1),
        },
        "micro": {
            "tp": TP, "fp": FP, "fn": FN, "precision": mp, "recall": mr,
            "f1": float(_ratio(2 * mp * mr, mp + mr)),
        },
        "macro": {"precision": macro(p), "recall": macro(r), "f1": macro(f1)},
        "accuracy": float(_ratio(TP, TP + FP + FN)),
    }
