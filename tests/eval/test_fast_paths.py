"""Fast paths of detection scoring against the plain computations they replace, bit for bit: greedy NMS in blocks
vs the row-per-kept-box loop, NMS of pre-filtered rows vs NMS of every row, the best class found on float32 scores
vs on float64 ones, and the YOLO decoders' candidate rows (``detect_parts.yolo_rows``) vs NMS of the whole decoded
output."""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.config import DetectOptions
from edgeslim.eval import detection
from edgeslim.eval.detection import DecodedLayout, box_iou, greedy_nms, nms, nms_rows
from edgeslim.models.yolo import YOLOV3_TINY_ANCHORS, YOLOV5_ANCHORS, YoloV3Decoder, YoloV5Decoder
from edgeslim.tasks.detect_parts import detect, yolo_rows


def _plain_greedy(boxes, scores, iou_thres):
    """The plain loop: best box first, drop the rest whose IoU with it is not <= thres (one box_iou row each)."""
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size:
        keep.append(order[0])
        order = order[1:][box_iou(boxes[order[0]], boxes[order[1:]])[0] <= iou_thres]
    return np.asarray(keep, np.int64)


def _clustered(rng, n):
    centres = rng.uniform(0, 200, (max(1, n // 40), 2))
    xy = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 5, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (n, 2))], axis=1)
    if n > 30:
        boxes[5:10] = boxes[0:5]  # duplicates
        boxes[10:13, 2:] = boxes[10:13, :2]  # zero area
        boxes[13] = np.nan
    return boxes, np.round(rng.uniform(0, 1, n), 2)  # tied scores


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 700, 1300])
def test_blocked_greedy_nms_keeps_the_plain_loops_indices(n):
    rng = np.random.default_rng(n)
    boxes, scores = _clustered(rng, n)
    for thres in (0.3, 0.6, 0.9):
        np.testing.assert_array_equal(greedy_nms(boxes, scores, thres), _plain_greedy(boxes, scores, thres))


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_greedy_nms_any_block_size(monkeypatch, block):
    monkeypatch.setattr(detection, "_NMS_MATRIX_MAX", 0)
    monkeypatch.setattr(detection, "_NMS_BLOCK", block)
    rng = np.random.default_rng(block)
    boxes, scores = _clustered(rng, 300)
    for thres in (0.45, 0.6):
        np.testing.assert_array_equal(greedy_nms(boxes, scores, thres), _plain_greedy(boxes, scores, thres))


def _pred(rng, n=2, a=400, nc=5, dtype=np.float32):
    boxes = np.stack([_clustered(rng, a)[0] for _ in range(n)])
    scores = (rng.random((n, a, nc)) ** 4).astype(dtype)
    scores[:, ::7, 1] = scores[:, ::7, 0]  # tied classes: the first wins
    scores[0, 3, 2] = np.nan
    return np.concatenate([boxes.astype(dtype), scores], axis=2)


@pytest.mark.parametrize("multi_label,agnostic", [(False, False), (True, False), (False, True)])
def test_nms_on_float32_equals_nms_on_float64(multi_label, agnostic):
    """The best class is read on float32 scores; the plain computation widened every score first."""
    pred = _pred(np.random.default_rng(1))
    kw = dict(conf_thres=0.01, iou_thres=0.5, multi_label=multi_label, agnostic=agnostic)
    for got, want in zip(nms(pred, **kw), nms(pred.astype(np.float64), **kw)):
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("multi_label", [False, True])
def test_nms_rows_without_the_non_candidates(multi_label):
    """Leaving out rows none of whose scores pass the threshold (order kept) changes nothing."""
    pred = _pred(np.random.default_rng(2))
    conf = 0.05
    kw = dict(conf_thres=conf, iou_thres=0.6, multi_label=multi_label)
    for x, want in zip(pred, nms(pred, **kw)):
        rows = (x[:, 4:].astype(np.float64) > conf).any(axis=1)
        assert 0 < rows.sum() < len(x)
        got = nms_rows(x[rows, :4], x[rows, 4:], **kw)
        assert got.tobytes() == want.tobytes()


def _heads(rng, decoder, n=2, sizes=(16, 8, 4)):
    """Raw head outputs: objectness logits spread around the thresholds' logits, with exact boundary values."""
    na, nc = decoder.anchors.shape[1], decoder.nc
    outs = []
    for h in sizes[:len(decoder.strides)]:
        o = rng.normal(0, 2.5, (n, na, nc + 5, h, h)).astype(np.float32)
        o[:, :, 4] = rng.uniform(-9, 2, (n, na, h, h))
        o[:, :, 4].flat[::11] = np.float32(np.log(0.001 / 0.999))  # sig(obj) on the 0.001 boundary
        o[:, :, 2:4] *= 3  # v3's exp(wh) up to its clamp
        outs.append(o.reshape(n, na * (nc + 5), h, h))
    return outs


@pytest.mark.parametrize("decoder", [YoloV5Decoder(YOLOV5_ANCHORS, (8, 16, 32), 6),
                                     YoloV3Decoder(YOLOV3_TINY_ANCHORS, (16, 32), 3)], ids=["v5", "v3"])
@pytest.mark.parametrize("conf", [0.001, 0.25])
def test_yolo_rows_detect_as_nms_of_the_whole_decode(decoder, conf):
    rng = np.random.default_rng(3)
    opts = DetectOptions(conf_thres=conf, iou_thres=0.6)
    for _ in range(3):
        outs = _heads(rng, decoder)
        full = decoder(outs)
        want = nms(full, conf_thres=conf, iou_thres=0.6)
        got = detect(outs, decoder, opts)
        assert sum(len(g) for g in got) > 0
        for g, w in zip(got, want):
            assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("decoder", [YoloV5Decoder(YOLOV5_ANCHORS, (8, 16, 32), 6),
                                     YoloV3Decoder(YOLOV3_TINY_ANCHORS, (16, 32), 3)], ids=["v5", "v3"])
def test_yolo_rows_are_the_decoded_rows(decoder):
    """Each kept row equals the whole decode's row at the same place; the rows left out hold no score > conf."""
    rng = np.random.default_rng(4)
    outs = _heads(rng, decoder)
    full = decoder(outs)
    conf = 0.001
    rows = yolo_rows(decoder, outs, conf)
    assert len(rows) == len(full)
    na, nc = decoder.anchors.shape[1], decoder.nc
    obj = np.concatenate([o.reshape(len(full), na, nc + 5, -1)[:, :, 4].reshape(len(full), -1) for o in outs], axis=1)
    for (b, sc), x, o in zip(rows, full, obj):
        assert b.dtype == sc.dtype == np.float32
        kept = (0.5 * (np.tanh(0.5 * o) + 1.0)).astype(np.float64) > conf
        assert 0 < kept.sum() < len(x)
        assert np.concatenate([b, sc], axis=1).tobytes() == x[kept].tobytes()
        assert not (x[~kept, 4:].astype(np.float64) > conf).any()


def test_detect_other_decoders_take_the_plain_path():
    """A decoded-output file's layout (no YOLO head): NMS of the decoder's whole output."""
    rng = np.random.default_rng(5)
    p = rng.random((2, 300, 7)).astype(np.float32)
    p[..., :2] *= 300
    p[..., 2:4] = p[..., 2:4] * 60 + 4
    opts = DetectOptions(conf_thres=0.01)
    assert yolo_rows(DecodedLayout(), [p], 0.01) is None
    for g, w in zip(detect([p], DecodedLayout(), opts), nms(DecodedLayout()([p]), conf_thres=0.01, iou_thres=0.6)):
        assert g.tobytes() == w.tobytes()


def test_conv_counts_equal_integer_convs(tmp_path):
    """The quantize job counts integer / all convs from the op counts it already has: eval.ort.integer_convs'
    figures (a QDQ file with one integer conv and one float conv)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeslim.eval.ort import integer_convs, optimized_op_counts
    from edgeslim.jobs.quantize import conv_counts

    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w")
    w2 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z8 = numpy_helper.from_array(np.array(0, np.int8), "z8")
    zu = numpy_helper.from_array(np.array(0, np.uint8), "zu")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "s", "z8"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "s", "zu"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "zu"], ["yd"]),
             helper.make_node("Conv", ["yd", "w2"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [w, w2, s, z8, zu])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    got = conv_counts(optimized_op_counts(path))
    assert got == integer_convs(path) and got[1] == 2 and got[0] == 1
