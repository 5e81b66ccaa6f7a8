"""Detectors: YOLOv5 (rebuilt from the ultralytics pickle without its code), FastestDet, YOLOv3-tiny.

Oracles: onnxruntime on the published FastestDet.onnx, onnxruntime on our own YOLOv3-tiny export, the
COCO128 labels for real-image sanity, hand-computed decoder values, and the checkpoint's own tensors.
"""

from __future__ import annotations

import fnmatch
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from edgeslim import api
from edgeslim.algorithms import ptq
from edgeslim.algorithms.layer_groups import group_plan
from edgeslim.algorithms.ptq import op_name
from edgeslim.config import PTQConfig
from edgeslim.errors import EdgeslimError
from edgeslim.graph import ops
from edgeslim.graph.capture import capture
from edgeslim.io.checkpoints import load_weights
from edgeslim.io.yolov5_loader import _tensors, load_yolov5, read_restricted
from edgeslim.models import DETECTORS, build_model, model_groups
from edgeslim.models.fastestdet import FastestDet, FastestDetDecoder
from edgeslim.models.yolo import (COCO_NAMES, YOLOV5_ANCHORS, YoloNet, YoloV3Decoder, YoloV5Decoder,
                                  detection_groups, yolov5, yolov5_cfg)
from edgeslim.quant.precision import LayerPrecision

SHARED = Path(__file__).resolve().parents[3] / "shared"
YOLOV5N = SHARED / "models" / "yolov5n.pt"
FASTESTDET_PTH = SHARED / "models" / "fastestdet" / "fastestdet_coco_ap05-0.2532.pth"
FASTESTDET_ONNX = SHARED / "models" / "fastestdet" / "FastestDet.onnx"
COCO128 = SHARED / "data" / "coco128.zip"
# val2017 images with one dominant object: a bear filling the frame, a stop sign.
VAL_IMAGES = ("000000000285", "000000000724")


def _need(*paths: Path) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"shared files absent: {', '.join(missing)}")


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _assert_groups_partition(model: nn.Module, shape: tuple[int, int, int]) -> None:
    """Every conv, and every op a plan can address (all but data movement), is in exactly one group; every
    pattern matches one of those names (what ``MixedPlan.check_patterns`` demands)."""
    groups = detection_groups(model)
    assert set(groups) == {"backbone", "neck", "head"}

    def owners(name: str) -> list[str]:
        return [g for g, pats in groups.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    gm = capture(model, shape)
    names = [op_name(gm, n) for n in gm.graph.nodes
             if n.op.startswith("call") and ops.kind(gm, n) not in ("pass", "meta")]
    for name in convs + names:
        assert len(owners(name)) == 1, (name, owners(name))
    for pats in groups.values():
        assert all(any(fnmatch.fnmatchcase(n, p) for n in convs + names) for p in pats), pats


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    return inter / (float(np.prod(a[2:] - a[:2])) + float(np.prod(b[2:] - b[:2])) - inter)


def _image_and_boxes(stem: str) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A COCO128 val image, its label classes and its label boxes as x1, y1, x2, y2 pixels."""
    with zipfile.ZipFile(COCO128) as z:
        img = Image.open(io.BytesIO(z.read(f"coco128/images/val2017/{stem}.jpg"))).convert("RGB")
        rows = np.loadtxt(io.BytesIO(z.read(f"coco128/labels/val2017/{stem}.txt")), ndmin=2)
    w, h = img.size
    cxcywh = rows[:, 1:] * np.array([w, h, w, h])
    return img, rows[:, 0].astype(int), np.concatenate((cxcywh[:, :2] - cxcywh[:, 2:] / 2,
                                                        cxcywh[:, :2] + cxcywh[:, 2:] / 2), 1)


def _assert_top_detection_matches(det: np.ndarray, classes: np.ndarray, boxes: np.ndarray) -> None:
    """The highest-scoring (box, class) is a labelled class and overlaps a box of that class (IoU > 0.5)."""
    best = int(det[:, 4:].max(1).argmax())
    cls = int(det[best, 4:].argmax())
    assert cls in classes, (COCO_NAMES[cls], [COCO_NAMES[c] for c in classes])
    assert max(_iou(det[best, :4], b) for b in boxes[classes == cls]) > 0.5


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics so random-weight outputs are O(1), not vanishingly small."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 1.0)
    return model.eval()


# ----------------------------------------------------------------------------- YOLOv5 structure


@pytest.mark.parametrize("size,params", [("n", 1_872_157), ("s", 7_235_389)])
def test_yolov5_builds_from_layer_list(size: str, params: int) -> None:
    """Published v6.x parameter counts; raw outputs (N, 3 * 85, H/s, W/s) at any multiple of 32."""
    model = yolov5(size).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.detect.stride == (8.0, 16.0, 32.0)
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 256, 320))
    assert [tuple(o.shape) for o in out] == [(2, 255, 32, 40), (2, 255, 16, 20), (2, 255, 8, 10)]


def test_yolov5_traces_and_groups_partition_the_graph() -> None:
    model = yolov5("n").eval()
    _assert_groups_partition(model, (3, 320, 320))
    assert detection_groups(model)["head"] == ["model.24.*"]
    assert "model.11.*" not in detection_groups(model)["neck"]  # an upsample: nothing a plan can name
    gm = capture(model, (3, 224, 224))  # 7x7 at stride 32
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(gm(x), model(x)):
            torch.testing.assert_close(a, b)
    sd = model.state_dict()
    assert {"model.0.conv.weight", "model.2.m.0.cv1.bn.running_var", "model.9.cv2.conv.weight",
            "model.24.anchors", "model.24.m.2.bias"} <= set(sd)


def test_yolo_layer_list_errors() -> None:
    cfg = yolov5_cfg("n")
    cfg["head"][0][2] = "BottleneckCSP"
    with pytest.raises(EdgeslimError, match="row 10 uses module 'BottleneckCSP'"):
        YoloNet(cfg)
    with pytest.raises(EdgeslimError, match="incomplete"):
        YoloNet({"nc": 80})
    cfg = yolov5_cfg("n")
    cfg["head"][2][0] = [-1, 99]
    with pytest.raises(EdgeslimError, match="row 12 .* is malformed \\(IndexError"):
        YoloNet(cfg)
    with pytest.raises(EdgeslimError, match="declares no detection groups"):
        detection_groups(nn.Conv2d(3, 3, 1))


# ----------------------------------------------------------------------------- decoders


def test_yolov5_decoder_matches_the_formula() -> None:
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]]
    dec = YoloV5Decoder(anchors, (8, 16), nc=2)
    rng = np.random.default_rng(0)
    outs = [rng.standard_normal((1, 3 * 7, 4, 6)).astype(np.float32), np.zeros((1, 21, 2, 3), np.float32)]
    got = dec(outs)
    assert got.shape == (1, 3 * 4 * 6 + 3 * 2 * 3, 6)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    a, y, x = 2, 3, 5  # level 0, anchor 2, row 3, column 5
    t = outs[0][0, a * 7:(a + 1) * 7, y, x]
    cx, cy = (2 * sig(t[0]) - 0.5 + x) * 8, (2 * sig(t[1]) - 0.5 + y) * 8
    bw, bh = (2 * sig(t[2])) ** 2 * 33, (2 * sig(t[3])) ** 2 * 23
    want = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, sig(t[4]) * sig(t[5]), sig(t[4]) * sig(t[6])]
    np.testing.assert_allclose(got[0, a * 24 + y * 6 + x], want, rtol=1e-5, atol=1e-4)
    # zero logits on level 1: centred in the cell, anchor-sized, scores 1/4
    row = got[0, 72 + 1 * 6 + 1 * 3 + 2]  # anchor 1, row 1, column 2
    np.testing.assert_allclose(row, [(2.5 * 16) - 31, (1.5 * 16) - 22.5, 2.5 * 16 + 31, 1.5 * 16 + 22.5, 0.25, 0.25])
    with pytest.raises(EdgeslimError, match="expects 2 head outputs"):
        dec(outs[:1])


def test_yolov3_decoder_boxes() -> None:
    dec = YoloV3Decoder([[10, 14, 23, 27, 37, 58]], (16,), nc=1)
    out = np.zeros((1, 18, 2, 2), np.float32)
    out[0, 6 + 2] = np.log(2.0)  # anchor 1: w = 2 * 23
    got = dec([out])[0]
    np.testing.assert_allclose(got[4 + 3], [24 - 23, 24 - 13.5, 24 + 23, 24 + 13.5, 0.25], rtol=1e-6)


# ----------------------------------------------------------------------------- YOLOv5 checkpoint


def test_yolov5n_checkpoint_loads_every_tensor_once() -> None:
    _need(YOLOV5N)
    model, meta = load_yolov5(YOLOV5N)
    tree = read_restricted(YOLOV5N)["model"]
    found = list(_tensors(tree))
    sd = model.state_dict()
    assert len(found) == len({k for k, _ in found}) == len(sd) == 349
    assert {k for k, _ in found} == set(sd)
    for k, t in found:
        torch.testing.assert_close(sd[k], t.float() if t.is_floating_point() else t, rtol=0, atol=0)
    assert meta["stride"] == (8.0, 16.0, 32.0) and meta["nc"] == 80 and meta["imgsz"] == 640
    assert meta["anchors"] == [list(map(float, a)) for a in YOLOV5_ANCHORS]
    assert tuple(meta["names"]) == COCO_NAMES
    ours = yolov5_cfg("n")
    plain = lambda rows: [[f, n, m, [None if a == "None" else a for a in args]] for f, n, m, args in rows]  # noqa: E731
    assert plain(meta["yaml"]["backbone"]) == ours["backbone"] and plain(meta["yaml"]["head"]) == ours["head"]


def test_yolov5n_detects_coco128_objects() -> None:
    _need(YOLOV5N, COCO128)
    model, info = build_model("yolov5n", weights=YOLOV5N)
    assert info.task == "detect" and info.input_shape == (3, 640, 640) and info.class_names == COCO_NAMES
    for stem in VAL_IMAGES:
        img, classes, boxes = _image_and_boxes(stem)
        w, h = img.size
        r = 640 / max(w, h)
        nw, nh = round(w * r), round(h * r)
        dx, dy = (640 - nw) // 2, (640 - nh) // 2
        canvas = np.full((640, 640, 3), 114, np.uint8)  # letterbox, YOLOv5's grey
        canvas[dy:dy + nh, dx:dx + nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR))
        x = torch.from_numpy(canvas.transpose(2, 0, 1).astype(np.float32) / 255)[None]
        with torch.no_grad():
            det = info.decoder([o.numpy() for o in model(x)])[0]
        det[:, :4] = (det[:, :4] - np.array([dx, dy, dx, dy])) / r
        _assert_top_detection_matches(det, classes, boxes)


def test_yolov5_zoo_loader_paths(tmp_path: Path) -> None:
    _need(YOLOV5N)
    with pytest.raises(EdgeslimError, match="depth/width multiples 0.33/0.25, not the requested 0.33/0.5"):
        build_model("yolov5s", weights=YOLOV5N)
    model, _ = load_yolov5(YOLOV5N)
    torch.save(model.state_dict(), tmp_path / "ours.pt")  # a plain state_dict goes through the same loader
    again, info = build_model("yolov5n", weights=tmp_path / "ours.pt")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(again(x), model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(EdgeslimError, match="holds no YOLOv5 model"):
        build_model("yolov5n", weights=tmp_path / "other.pt")


def test_restricted_reader_keeps_plain_data(tmp_path: Path) -> None:
    """What training checkpoints hold besides modules (numpy scalars and arrays, sets, dtypes) still loads."""
    data = {"best_fitness": np.float64(0.5), "arr": np.arange(3), "half": torch.ones(2, dtype=torch.float16),
            "tags": {"a", "b"}, "dtype": torch.float32, "size": torch.Size([2, 3])}
    torch.save(data, tmp_path / "plain.pt")
    got = read_restricted(tmp_path / "plain.pt")
    assert got["best_fitness"] == 0.5 and got["arr"].tolist() == [0, 1, 2] and got["tags"] == {"a", "b"}
    assert got["half"].dtype == torch.float16 and got["dtype"] is torch.float32 and got["size"] == (2, 3)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("fn", [os.system, eval], ids=["os.system", "eval"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, fmt: str, fn) -> None:
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pt"
    payload = {"model": _Evil(fn, arg), "epoch": -1}
    if fmt == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    qual = f"{fn.__module__}.{fn.__name__}"  # posix.system / builtins.eval
    with pytest.raises(EdgeslimError, match=f"refers to {qual}, which no weights file needs") as err:
        load_yolov5(path)
    assert "\n" not in str(err.value)
    with pytest.raises(EdgeslimError, match="refused to unpickle"):
        build_model("yolov5n", weights=path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- FastestDet


def test_fastestdet_matches_published_onnx() -> None:
    """Our definition + the .pth, with the ONNX graph's head activations, equals onnxruntime on FastestDet.onnx."""
    _need(FASTESTDET_PTH, FASTESTDET_ONNX)
    model, info = build_model("fastestdet", weights=FASTESTDET_PTH)
    assert info.task == "detect" and info.input_shape == (3, 352, 352) and info.channel_order == "BGR"
    assert sum(p.numel() for p in model.parameters()) == 244_490
    x = np.random.default_rng(0).random((1, 3, 352, 352), dtype=np.float32)
    sess = _session(FASTESTDET_ONNX)
    want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        raw = [o.numpy() for o in model(torch.from_numpy(x))]
    assert [r.shape for r in raw] == [(1, 1, 22, 22), (1, 4, 22, 22), (1, 80, 22, 22)]
    got = info.decoder.activate(raw)
    assert want.shape == got.shape == (1, 85, 22, 22)
    assert np.abs(got - want).max() <= 1e-4


def test_fastestdet_traces_groups_and_detects() -> None:
    model = FastestDet().eval()
    _assert_groups_partition(model, (3, 352, 352))
    if not (FASTESTDET_PTH.is_file() and COCO128.is_file()):
        pytest.skip("shared FastestDet weights / COCO128 absent")
    load_weights(model, FASTESTDET_PTH)
    dec = model.make_decoder()
    for stem in VAL_IMAGES:
        img, classes, boxes = _image_and_boxes(stem)
        w, h = img.size
        bgr = np.asarray(img.resize((352, 352), Image.BILINEAR), dtype=np.float32)[..., ::-1] / 255
        x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
        with torch.no_grad():
            det = dec([o.numpy() for o in model(x)])[0]
        assert det.shape == (22 * 22, 84)
        det[:, :4] *= np.array([w, h, w, h]) / 352
        _assert_top_detection_matches(det, classes, boxes)


def test_fastestdet_decoder_boxes() -> None:
    dec = FastestDetDecoder(nc=2, stride=16)
    raw = np.zeros((1, 7, 2, 3), np.float32)  # 2x3 cells of 16 px: a 48x32 input
    raw[0, 4, 1, 2] = np.log(3.0)  # sigmoid = 3/4 of the input's height
    got = dec([raw[:, :1], raw[:, 1:5], raw[:, 5:]])
    np.testing.assert_array_equal(got, dec([raw]))
    score = 0.5 ** 0.6 * 0.5 ** 0.4
    # cell (y 1, x 2): tanh(0) = 0 puts the centre on the cell's corner (32, 16), FastestDet adds no 0.5
    np.testing.assert_allclose(got[0, 5], [32 - 12, 16 - 12, 32 + 12, 16 + 12, score, score], rtol=1e-6)
    with pytest.raises(EdgeslimError, match="1 \\+ 4 \\+ 2 channels"):
        dec([raw[:, :6]])


# ----------------------------------------------------------------------------- YOLOv3-tiny


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding:UserWarning")
def test_yolov3_tiny_structure_groups_and_onnx(tmp_path: Path) -> None:
    model, info = build_model("yolov3-tiny")
    assert info.input_shape == (3, 416, 416) and isinstance(info.decoder, YoloV3Decoder)
    assert sum(p.numel() for p in model.parameters()) == 8_852_366  # darknet yolov3-tiny.cfg, 80 classes
    _random_bn(model)
    _assert_groups_partition(model, (3, 416, 416))
    assert detection_groups(model)["head"] == ["model.19.*"]
    x = torch.randn(1, 3, 416, 416)
    with torch.no_grad():
        want = [o.numpy() for o in model(x)]
    assert [w.shape for w in want] == [(1, 255, 26, 26), (1, 255, 13, 13)]
    assert 0.1 < np.abs(want[0]).max() < 1e4
    path = tmp_path / "yolov3_tiny.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["p4", "p5"])
    got = _session(path).run(None, {"images": x.numpy()})
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 + 1e-6 * np.abs(w).max()  # float32 sums; onnxruntime threads vary the order
    assert info.decoder(got).shape == (1, 3 * (26 * 26 + 13 * 13), 84)


@pytest.mark.parametrize("name", ["yolov5n", "yolov3-tiny"])
def test_group_plan_quantizes_backbone_only(name: str) -> None:
    """The groups drive a partial-quantization plan (seed 002: INT8 backbone, FP32 neck and head)."""
    model, info = build_model(name)
    groups = model_groups(model, info)
    int8, fp32 = LayerPrecision.parse("int8"), LayerPrecision.parse("fp32")
    plan = group_plan(groups, {"backbone": int8, "neck": fp32, "head": fp32})
    q = api.quantize(model, torch.rand(2, 3, 64, 64), PTQConfig(), plan=plan)  # patterns checked here
    n_int = 0
    for node in ptq.weighted_nodes(q.model):
        in_backbone = any(fnmatch.fnmatchcase(op_name(q.model, node), p) for p in groups["backbone"])
        assert ops.module(q.model, node).spec.is_float is not in_backbone
        n_int += in_backbone
    assert 0 < n_int < len(ptq.weighted_nodes(q.model))
    # every plan unit (gated SiLUs included) lies in one of the groups: all groups FP32 is the FP32 model
    patterns = [p for g in groups.values() for p in g]
    outside = [n for n in ptq.plan_names(q.model) if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    assert outside == []


def test_detectors_are_registered() -> None:
    assert set(DETECTORS) == {"yolov5n", "yolov5s", "yolov3-tiny", "fastestdet"}
    model, info = build_model("yolov5s", input_shape=(3, 320, 320))
    assert isinstance(model, YoloNet) and info.input_shape == (3, 320, 320) and info.num_classes == 80
    assert build_model("yolov5n")[1].decoder is DETECTORS["yolov5n"].info.decoder
    assert build_model("resnet20")[1].task == "classify"
