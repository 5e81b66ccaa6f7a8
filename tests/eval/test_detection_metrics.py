"""edgeslim.eval.detection against oracles: pycocotools COCOeval, slow reference loops, hand counts."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from edgeslim.errors import EdgeslimError
from edgeslim.eval.detection import (
    box_iou,
    confusion_matrix,
    cxcywh_to_xyxy,
    evaluate_map,
    nms,
    precision_recall_f1,
)


def synthetic_set(seed: int, n_images: int = 30, nc: int = 5):
    """GT boxes; detections = jittered GT copies (some missing, some relabelled) + random false positives."""
    rng = np.random.default_rng(seed)
    targets, dets = [], []
    for i in range(n_images):
        k = int(rng.integers(0, 8)) if i != 3 else 0  # image 3: no objects
        xy = rng.uniform(0, 400, (k, 2))
        wh = rng.uniform(20, 200, (k, 2))
        gb = np.concatenate([xy, xy + wh], axis=1)
        gc = rng.integers(0, nc - 1, k)  # class nc-1 never has ground truth
        rows = []
        for b, c in zip(gb, gc):
            for _ in range(int(rng.integers(0, 3))):  # 0 copies = missed, 2 = duplicate
                size = np.array([b[2] - b[0], b[3] - b[1]] * 2)
                jb = b + rng.normal(0, 0.12, 4) * size
                jb[2:] = np.maximum(jb[2:], jb[:2] + 2)
                cc = c if rng.random() > 0.1 else rng.integers(0, nc)
                rows.append([*jb, rng.random(), cc])
        for _ in range(int(rng.integers(0, 6))):
            xy = rng.uniform(0, 450, 2)
            rows.append([*xy, *(xy + rng.uniform(10, 150, 2)), rng.random() * 0.7, rng.integers(0, nc)])
        if i == 5:  # more than COCO's 100 detections per image and class
            for _ in range(130):
                xy = rng.uniform(0, 450, 2)
                rows.append([*xy, *(xy + rng.uniform(20, 150, 2)), rng.random(), 0])
        dets.append(np.asarray(rows, np.float64).reshape(-1, 6))
        targets.append((gb, gc))
    return dets, targets


def coco_eval(dets, targets, nc: int):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for i, (det, (gb, gc)) in enumerate(zip(dets, targets)):
        images.append({"id": i, "width": 640, "height": 640})
        for b, c in zip(gb, gc):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
                         "bbox": [b[0], b[1], w, h], "area": w * h})
        for d in det:
            results.append({"image_id": i, "category_id": int(d[5]), "score": float(d[4]),
                            "bbox": [d[0], d[1], d[2] - d[0], d[3] - d[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = ev.eval["precision"][:, :, :, 0, 2]  # T, R, K at area 'all', maxDets 100
    return ev.stats, per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_map_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    dets, targets = synthetic_set(seed)
    # Snap coordinates to float values whose xywh round trip is exact, so both see the same boxes.
    dets = [np.concatenate([np.round(d[:, :4] * 64) / 64, d[:, 4:]], axis=1) for d in dets]
    targets = [(np.round(b * 64) / 64, c) for b, c in targets]
    ours = evaluate_map(dets, targets, num_classes=5)
    stats, per_class = coco_eval(dets, targets, 5)
    assert abs(ours["map50_95"] - stats[0]) < 1e-12
    assert abs(ours["map50"] - stats[1]) < 1e-12
    for c in range(5):
        ref = per_class[:, :, c]
        if (ref == -1).all():
            assert math.isnan(ours["per_class_ap"][c]) and ours["per_class_num_gt"][c] == 0
        else:
            assert abs(ours["per_class_ap"][c] - ref.mean()) < 1e-12
            assert abs(ours["per_class_ap50"][c] - ref[0].mean()) < 1e-12
    assert ours["num_images"] == 30 and ours["num_gt"] == sum(len(c) for _, c in targets)
    assert 0.1 < ours["map50_95"] < ours["map50"] < 0.95  # a non-trivial set


def test_evaluate_map_perfect_and_empty():
    gb = np.array([[0, 0, 10, 10], [20, 20, 40, 50]], float)
    dets = [np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 40, 50, 0.8, 1]])]
    m = evaluate_map(dets, [(gb, np.array([0, 1]))], num_classes=3)
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert math.isnan(m["per_class_ap"][2])
    none = evaluate_map([np.zeros((0, 6))], [(gb, np.array([0, 1]))], num_classes=2)
    assert none["map50"] == 0.0
    with pytest.raises(EdgeslimError, match="class id 1 outside 0..0"):
        evaluate_map(dets, [(gb, np.array([0, 1]))], num_classes=1)
    with pytest.raises(EdgeslimError, match="2 detection arrays for 1 images"):
        evaluate_map(dets * 2, [(gb, np.array([0, 1]))], num_classes=2)


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 25]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [3, 3, 3, 3]], float)
    got = box_iou(a, b)
    # a0 vs b0: overlap 5x10 = 50, union 100 + 100 - 50 = 150. a1 (10x20 = 200) vs b0: overlap
    # 10x5 = 50, union 250; a1 vs b2: overlap 5x5 = 25, union 275. b3 is a point (area 0).
    want = np.array([[50 / 150, 0, 1, 0], [50 / 250, 0, 25 / 275, 0]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def reference_nms(pred, conf, iou_thres, max_det, multi_label, agnostic):
    """Slow, independent: python loops and scalar IoU."""

    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        u = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - iw * ih
        return iw * ih / u if u > 0 else 0.0

    out = []
    for x in pred:
        cands = []
        for row in x:
            box, sc = [float(v) for v in row[:4]], [float(v) for v in row[4:]]
            if multi_label:
                cands += [(s, c, box) for c, s in enumerate(sc) if s > conf]
            else:
                c = max(range(len(sc)), key=lambda j: (sc[j], -j))
                if sc[c] > conf:
                    cands.append((sc[c], c, box))
        cands.sort(key=lambda t: -t[0])
        kept = []
        for s, c, box in cands:
            if all(iou(box, kb) <= iou_thres for ks, kc, kb in kept if agnostic or kc == c):
                kept.append((s, c, box))
        out.append(np.array([[*b, s, c] for s, c, b in kept[:max_det]], np.float64).reshape(-1, 6))
    return out


@pytest.mark.parametrize("multi_label,agnostic", [(False, False), (True, False), (False, True)])
def test_nms_matches_reference(multi_label, agnostic):
    rng = np.random.default_rng(7)
    n, a, nc = 2, 300, 4
    centers = rng.uniform(50, 250, (n, 12, 2))  # clusters of overlapping boxes
    xy = centers[:, rng.integers(0, 12, a)] + rng.normal(0, 8, (n, a, 2))
    wh = rng.uniform(20, 60, (n, a, 2))
    scores = rng.random((n, a, nc)) ** 3
    pred = np.concatenate([xy - wh / 2, xy + wh / 2, scores], axis=2)
    got = nms(pred, conf_thres=0.05, iou_thres=0.5, max_det=40, multi_label=multi_label, agnostic=agnostic)
    want = reference_nms(pred, 0.05, 0.5, 40, multi_label, agnostic)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and len(g) == len(w) > 10
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-4)
    # cx, cy, w, h input gives the same result
    cxcywh = np.concatenate([xy, wh, scores], axis=2)
    again = nms(cxcywh, conf_thres=0.05, iou_thres=0.5, max_det=40, multi_label=multi_label,
                agnostic=agnostic, box_format="cxcywh")
    for g, h in zip(got, again):
        np.testing.assert_allclose(g, h, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(cxcywh_to_xyxy(cxcywh[..., :4]), pred[..., :4])
    with pytest.raises(EdgeslimError, match="box_format"):
        nms(pred, box_format="xywh")


def test_confusion_matrix_by_hand():
    gb = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], float)
    gc = np.array([0, 1, 1, 2])
    dets = np.array([
        [0, 0, 10, 10, 0.9, 0],    # TP class 0
        [1, 0, 11, 10, 0.8, 0],    # duplicate of gt 0: the gt is taken -> FP class 0
        [20, 0, 30, 10, 0.7, 2],   # right place, wrong class: pred 2, true 1
        [40, 0, 50, 10, 0.1, 1],   # below conf_thres: ignored -> gt 2 missed
        [80, 0, 90, 10, 0.6, 1],   # nothing there: FP class 1
        [61, 0, 71, 10, 0.5, 2],   # IoU 9/11 with gt 3: TP class 2
    ], float)
    m = confusion_matrix([dets], [(gb, gc)], num_classes=3)
    want = np.zeros((4, 4), int)
    want[0, 0] = 1
    want[0, 3] = 1
    want[2, 1] = 1
    want[3, 1] = 1
    want[1, 3] = 1
    want[2, 2] = 1
    np.testing.assert_array_equal(m, want)
    # one-to-one, highest IoU first: the better box takes the gt even with a lower score
    d2 = np.array([[2, 0, 12, 10, 0.9, 0], [0, 0, 10, 10, 0.3, 0]], float)
    m2 = confusion_matrix([d2], [(gb[:1], gc[:1])], num_classes=3)
    assert m2[0, 0] == 1 and m2[0, 3] == 1 and m2[3, 0] == 0


def test_precision_recall_f1_by_hand():
    m = np.zeros((4, 4), int)
    m[0, 0], m[0, 3], m[2, 1], m[3, 1], m[1, 3], m[2, 2] = 1, 1, 1, 1, 1, 1
    r = precision_recall_f1(m)
    pc = r["per_class"]
    # class 0: TP 1, FP 1, FN 0; class 1: TP 0, FP 1 (background), FN 2; class 2: TP 1, FP 1 (true 1), FN 0
    assert pc["tp"] == [1, 0, 1] and pc["fp"] == [1, 1, 1] and pc["fn"] == [0, 2, 0]
    assert pc["precision"] == [0.5, 0.0, 0.5] and pc["recall"] == [1.0, 0.0, 1.0]
    assert pc["f1"] == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert r["micro"] == {"tp": 2, "fp": 3, "fn": 2, "precision": 0.4, "recall": 0.5,
                          "f1": pytest.approx(2 * 0.4 * 0.5 / 0.9)}
    assert r["macro"]["precision"] == pytest.approx(1 / 3) and r["macro"]["recall"] == pytest.approx(2 / 3)
    assert r["macro"]["f1"] == pytest.approx(4 / 9)
    assert r["accuracy"] == pytest.approx(2 / 7)
    m5 = np.zeros((5, 5), int)
    keep = [0, 1, 2, 4]  # the same counts with an extra class 3 that never occurs
    m5[np.ix_(keep, keep)] = m
    r5 = precision_recall_f1(m5)
    assert math.isnan(r5["per_class"]["precision"][3])
    assert r5["macro"]["f1"] == pytest.approx(4 / 9)
    with pytest.raises(EdgeslimError, match="shape"):
        precision_recall_f1(np.zeros((3, 2)))


def _nms_row_by_row(boxes, scores, iou_thres):
    """Greedy NMS written plainly (the reference): best box first, drop the rest whose IoU with it is not <= thres."""
    from edgeslim.eval.detection import box_iou

    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        keep.append(order[0])
        order = order[1:][box_iou(boxes[order[0]], boxes[order[1:]])[0] <= iou_thres]
    return np.asarray(keep, np.int64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("matrix", [True, False])
def test_greedy_nms_keeps_what_the_row_by_row_loop_keeps(monkeypatch, seed, matrix):
    """Clustered boxes (many overlaps near every threshold), exact duplicates, tied scores, degenerate and NaN
    boxes: the IoU-matrix path and the row-per-kept-box path keep exactly the reference's indices."""
    from edgeslim.eval import detection

    if not matrix:
        monkeypatch.setattr(detection, "_NMS_MATRIX_MAX", 0)
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 100, (6, 2))
    xy = centres[rng.integers(0, 6, 300)] + rng.normal(0, 4, (300, 2))
    wh = rng.uniform(5, 30, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[10:20] = boxes[0:10]  # duplicates
    boxes[20:25, 2:] = boxes[20:25, :2]  # zero-area boxes
    boxes[25, :] = np.nan
    scores = np.round(rng.uniform(0, 1, 300), 2)  # ties
    for thres in (0.3, 0.45, 0.6, 0.9):
        np.testing.assert_array_equal(detection.greedy_nms(boxes, scores, thres), _nms_row_by_row(boxes, scores, thres))
