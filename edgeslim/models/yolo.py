"""YOLOv5 (v6.x layer layout) and YOLOv3-tiny, written here and shaped for quantization.

Both are built by one small parser from a layer list in the form YOLOv5 checkpoints embed
(``model.yaml``: ``depth_multiple``, ``width_multiple``, ``anchors``, ``backbone`` and ``head`` rows of
``[from, repeats, module, args]``), so module names are ``model.<row>.<part>`` and an ultralytics
state_dict maps onto ours key for key (``edgeslim.io.yolov5_loader``).

Design for quantization: ``forward`` returns only the raw output convolutions of the ``Detect`` layer,
one ``(N, na * (5 + nc), H, W)`` tensor per stride. Everything in the graph is conv / BN / activation /
concat / nearest upsample / max pool (and zero padding for YOLOv3-tiny), so ``torch.fx`` traces it and
the integer engine can run all of it; the sigmoid and grid decoding happen afterwards in numpy
(``YoloV5Decoder`` / ``YoloV3Decoder``), in float, where they cost nothing on the device budget.

Groups for partial quantization (Shin and Shin): ``backbone`` = the layer list's backbone rows, ``neck`` = its
head rows except ``Detect``, ``head`` = ``Detect`` (the output convs); see ``detection_groups``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgeslimError

__all__ = ["YOLOV5_BACKBONE", "YOLOV5_HEAD", "YOLOV5_ANCHORS", "YOLOV5_SIZES", "YOLOV3_TINY_BACKBONE",
           "YOLOV3_TINY_HEAD", "YOLOV3_TINY_ANCHORS", "COCO_NAMES", "Conv", "dark_conv", "Bottleneck", "C3", "SPPF",
           "MaxPoolSame", "Concat", "Detect", "YoloNet", "yolov5_cfg", "yolov5", "yolov3_tiny", "detection_groups",
           "YoloV5Decoder", "YoloDecode", "YoloV3Decoder"]


# YOLOv5 v6.x P3-P5 layer list (Jocher et al., ultralytics/yolov5 release 6.0): n/s/m/l/x differ only in
# the depth / width multiples. Rows are (from, repeats, module, args); channel counts are for width 1.0.
YOLOV5_BACKBONE = (
    (-1, 1, "Conv", (64, 6, 2, 2)), (-1, 1, "Conv", (128, 3, 2)), (-1, 3, "C3", (128,)),
    (-1, 1, "Conv", (256, 3, 2)), (-1, 6, "C3", (256,)), (-1, 1, "Conv", (512, 3, 2)),
    (-1, 9, "C3", (512,)), (-1, 1, "Conv", (1024, 3, 2)), (-1, 3, "C3", (1024,)), (-1, 1, "SPPF", (1024, 5)),
)
YOLOV5_HEAD = (
    (-1, 1, "Conv", (512, 1, 1)), (-1, 1, "nn.Upsample", (None, 2, "nearest")), ((-1, 6), 1, "Concat", (1,)),
    (-1, 3, "C3", (512, False)), (-1, 1, "Conv", (256, 1, 1)), (-1, 1, "nn.Upsample", (None, 2, "nearest")),
    ((-1, 4), 1, "Concat", (1,)), (-1, 3, "C3", (256, False)), (-1, 1, "Conv", (256, 3, 2)),
    ((-1, 14), 1, "Concat", (1,)), (-1, 3, "C3", (512, False)), (-1, 1, "Conv", (512, 3, 2)),
    ((-1, 10), 1, "Concat", (1,)), (-1, 3, "C3", (1024, False)), ((17, 20, 23), 1, "Detect", ("nc", "anchors")),
)
YOLOV5_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
YOLOV5_SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}

# YOLOv3-tiny (Redmon & Farhadi 2018, darknet yolov3-tiny.cfg) in the same row format: 3x3 conv-BN-leaky
# and 2x2 max pools; the 6th pool has stride 1 after a right/bottom zero pad, heads at strides 16 and 32.
YOLOV3_TINY_BACKBONE = (
    (-1, 1, "DarkConv", (16, 3)), (-1, 1, "MaxPool", (2, 2)), (-1, 1, "DarkConv", (32, 3)),
    (-1, 1, "MaxPool", (2, 2)), (-1, 1, "DarkConv", (64, 3)), (-1, 1, "MaxPool", (2, 2)),
    (-1, 1, "DarkConv", (128, 3)), (-1, 1, "MaxPool", (2, 2)), (-1, 1, "DarkConv", (256, 3)),
    (-1, 1, "MaxPool", (2, 2)), (-1, 1, "DarkConv", (512, 3)), (-1, 1, "MaxPoolSame", (2,)),
    (-1, 1, "DarkConv", (1024, 3)),
)
YOLOV3_TINY_HEAD = (
    (-1, 1, "DarkConv", (256, 1)), (-1, 1, "DarkConv", (512, 3)), (-2, 1, "DarkConv", (128, 1)),
    (-1, 1, "nn.Upsample", (None, 2, "nearest")), ((-1, 8), 1, "Concat", (1,)), (-1, 1, "DarkConv", (256, 3)),
    ((18, 14), 1, "Detect", ("nc", "anchors")),
)
YOLOV3_TINY_ANCHORS = ((10, 14, 23, 27, 37, 58), (81, 82, 135, 169, 344, 319))

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


class Conv(nn.Module):
    """conv (no bias) -> BN (eps 1e-3, momentum 0.03 as YOLOv5 trains it) -> activation; 'same' padding."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def dark_conv(c1: int, c2: int, k: int = 3, s: int = 1) -> Conv:
    """Darknet's conv-BN-LeakyReLU(0.1)."""
    return Conv(c1, c2, k, s, act=nn.LeakyReLU(0.1))


class Bottleneck(nn.Module):
    """1x1 -> 3x3, plus the input when ``shortcut`` and the widths agree (fixed at build time: traceable)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: cv3(cat(m(cv1(x)), cv2(x)))."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_, 1), Conv(c1, c_, 1), Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k stride-1 max pools (one module per call site)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(k, 1, k // 2) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool1(x)
        y2 = self.pool2(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool3(y2)), 1))


class MaxPoolSame(nn.Module):
    """Darknet's size-2 stride-1 max pool: zero pad right and bottom by one, then pool (keeps H, W)."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.pool = nn.MaxPool2d(k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, (0, self.k - 1, 0, self.k - 1)))


class Concat(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """The output 1x1 convs (with bias), one per stride. ``anchors`` is (levels, na, 2) in grid units
    (pixels / stride), as YOLOv5 stores it; ``stride`` is a plain tuple, known from the layer list."""

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], ch: Sequence[int],
                 stride: Sequence[float]) -> None:
        super().__init__()
        self.nc, self.nl, self.na = nc, len(anchors), len(anchors[0]) // 2
        self.no = nc + 5
        self.stride = tuple(float(s) for s in stride)
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2)
        self.register_buffer("anchors", a / torch.tensor(self.stride).view(-1, 1, 1))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(conv(x) for conv, x in zip(self.m, xs))


class YoloNet(nn.Module):
    """A YOLO network built from a YOLOv5-style layer dict; ``forward`` returns the raw head tensors.

    ``cfg`` is that dict (``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``, ``backbone``,
    ``head``); an extra ``decode: "v3"`` selects YOLOv3's box formula in ``make_decoder``.
    """

    def __init__(self, cfg: Mapping, ch: int = 3) -> None:
        super().__init__()
        self.cfg = _plain(cfg)
        layers, self.froms = _parse(self.cfg, ch)
        self.model = nn.ModuleList(layers)
        self.nc = self.detect.nc
        n_back, n_all = len(self.cfg["backbone"]), len(layers)
        rows = {"backbone": range(n_back), "neck": range(n_back, n_all - 1), "head": range(n_all - 1, n_all)}
        self.groups = {g: [f"model.{i}.*" for i in r if _addressable(layers[i])] for g, r in rows.items()}

    @property
    def detect(self) -> Detect:
        return self.model[-1]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list = []
        for layer, f in zip(self.model, self.froms):
            if f != -1:  # construction-time constants: fx unrolls this loop
                x = outs[f] if isinstance(f, int) else [x if j == -1 else outs[j] for j in f]
            x = layer(x)
            outs.append(x)
        return x

    def make_decoder(self) -> YoloV5Decoder:
        """The numpy decoder matching this network's anchors, strides and box formula."""
        d = self.detect
        anchors = (d.anchors * torch.tensor(d.stride).view(-1, 1, 1)).reshape(d.nl, -1).tolist()
        cls = YoloV3Decoder if self.cfg.get("decode") == "v3" else YoloV5Decoder
        return cls(anchors, d.stride, d.nc)


def _addressable(layer: nn.Module) -> bool:
    """Does a row hold an op a precision plan can name (a conv, a concat)? Upsample / max-pool rows only move
    data (their ops keep the input's scale), so a pattern for them would match no layer."""
    return isinstance(layer, Concat) or any(isinstance(m, nn.Conv2d) for m in layer.modules())


def yolov5_cfg(size: str = "n", nc: int = 80) -> dict:
    """The v6.x layer dict for YOLOv5 ``n``/``s``/``m``/``l``/``x`` (what ultralytics checkpoints embed)."""
    if size not in YOLOV5_SIZES:
        raise EdgeslimError(f"YOLOv5 size '{size}' is unknown: use one of {', '.join(YOLOV5_SIZES)}")
    depth, width = YOLOV5_SIZES[size]
    return _plain({"nc": nc, "depth_multiple": depth, "width_multiple": width, "anchors": YOLOV5_ANCHORS,
                   "backbone": YOLOV5_BACKBONE, "head": YOLOV5_HEAD})


def yolov5(size: str = "n", nc: int = 80) -> YoloNet:
    """YOLOv5 v6.x with random weights, e.g. ``yolov5("n")`` (1.9M parameters, 640x640 input)."""
    return YoloNet(yolov5_cfg(size, nc))


def yolov3_tiny(nc: int = 80) -> YoloNet:
    """YOLOv3-tiny (8.8M parameters at nc=80, 416x416 input); outputs at strides 16 and 32."""
    return YoloNet({"nc": nc, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": YOLOV3_TINY_ANCHORS,
                    "backbone": YOLOV3_TINY_BACKBONE, "head": YOLOV3_TINY_HEAD, "decode": "v3"})


def detection_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{'backbone' | 'neck' | 'head': [fnmatch patterns]}`` over the names plans use (``MixedPlan``).

    One ``model.<row>.*`` per row that holds a conv or a concat (``model.12.cat``, ``model.13.cv1.conv``,
    ``model.24.m.0``); every pattern matches at least one plan name, as ``MixedPlan.check_patterns`` requires.

    >>> detection_groups(yolov5("n"))["head"]
    ['model.24.*']
    """
    groups = getattr(model, "groups", None)
    if not isinstance(groups, Mapping):
        raise EdgeslimError(f"model {type(model).__name__} declares no detection groups: build it with "
                            "edgeslim's detectors (yolov5n, yolov3-tiny, fastestdet) or write the patterns")
    return {k: list(v) for k, v in groups.items()}


class YoloV5Decoder:
    """Raw head outputs -> ``(N, A, 4 + nc)``: boxes x1, y1, x2, y2 in input pixels, then per-class
    scores ``sigmoid(obj) * sigmoid(cls)``. YOLOv5 v6 box formula: ``xy = (2 sig(t) - 0.5 + grid) * stride``,
    ``wh = (2 sig(t))^2 * anchor``. Rows are ordered level, anchor, y, x (as YOLOv5 flattens them).

    >>> dec = YoloV5Decoder(YOLOV5_ANCHORS, (8, 16, 32), 80)
    >>> dec([np.zeros((1, 255, 80, 80)), np.zeros((1, 255, 40, 40)), np.zeros((1, 255, 20, 20))]).shape
    (1, 25200, 84)
    """

    def __init__(self, anchors: Sequence[Sequence[float]], strides: Sequence[float], nc: int) -> None:
        self.anchors = np.asarray(anchors, dtype=np.float32).reshape(len(strides), -1, 2)  # pixels
        self.strides = tuple(float(s) for s in strides)
        self.nc = int(nc)

    def __call__(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        if len(outputs) != len(self.strides):
            raise EdgeslimError(f"decoder expects {len(self.strides)} head outputs, got {len(outputs)}: "
                                "pass the model's outputs in order")
        return np.concatenate([self._level(np.asarray(o, dtype=np.float32), i) for i, o in enumerate(outputs)], 1)

    def _level(self, out: np.ndarray, i: int) -> np.ndarray:
        n, _, h, w = out.shape
        na = self.anchors.shape[1]
        p = out.reshape(n, na, self.nc + 5, h, w).transpose(0, 1, 3, 4, 2)
        gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        grid = np.stack((gx, gy), -1)[None, None]  # (1, 1, h, w, 2)
        xy, wh = self._boxes(p[..., :4], grid, self.strides[i], self.anchors[i].reshape(1, na, 1, 1, 2))
        scores = _sigmoid(p[..., 4:5]) * _sigmoid(p[..., 5:])
        boxes = np.concatenate((xy - wh / 2, xy + wh / 2), -1)
        return np.concatenate((boxes, scores), -1).reshape(n, -1, 4 + self.nc)

    @staticmethod
    def _boxes(t: np.ndarray, grid: np.ndarray, stride: float, anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = _sigmoid(t)
        return (s[..., :2] * 2 - 0.5 + grid) * stride, (s[..., 2:] * 2) ** 2 * anchor


    def module(self) -> nn.Module:
        """The same decoding as a torch module for the ONNX graph: raw heads -> ``(N, A, 5 + nc)`` in YOLOv5's
        exported layout: cx, cy, w, h in input pixels, objectness, per-class probabilities (score = obj * cls)."""
        return YoloDecode(self)

    @staticmethod
    def torch_boxes(t: torch.Tensor, grid: torch.Tensor, stride: float, anchor: torch.Tensor):
        s = torch.sigmoid(t)
        return (s[..., :2] * 2 - 0.5 + grid) * stride, (s[..., 2:] * 2) ** 2 * anchor


class YoloDecode(nn.Module):
    """``YoloV5Decoder`` / ``YoloV3Decoder`` in torch (see ``YoloV5Decoder.module``); grids are constants."""

    def __init__(self, decoder: YoloV5Decoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("anchors", torch.from_numpy(decoder.anchors.copy()))

    def forward(self, *outputs: torch.Tensor) -> torch.Tensor:
        dec, rows = self.decoder, []
        for i, out in enumerate(outputs):
            n, _, h, w = out.shape
            na = dec.anchors.shape[1]
            p = out.reshape(-1, na, dec.nc + 5, h, w).permute(0, 1, 3, 4, 2)
            gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                    indexing="ij")
            grid = torch.stack((gx, gy), -1)[None, None]
            xy, wh = dec.torch_boxes(p[..., :4], grid, dec.strides[i], self.anchors[i].reshape(1, na, 1, 1, 2))
            rows.append(torch.cat((xy, wh, torch.sigmoid(p[..., 4:])), -1).reshape(-1, na * h * w, 5 + dec.nc))
        return torch.cat(rows, 1)


class YoloV3Decoder(YoloV5Decoder):
    """YOLOv3 boxes: ``xy = (sig(t) + grid) * stride``, ``wh = exp(t) * anchor``; scores as YOLOv5."""

    @staticmethod
    def _boxes(t: np.ndarray, grid: np.ndarray, stride: float, anchor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (_sigmoid(t[..., :2]) + grid) * stride, np.exp(np.minimum(t[..., 2:], 30.0)) * anchor

    @staticmethod
    def torch_boxes(t: torch.Tensor, grid: torch.Tensor, stride: float, anchor: torch.Tensor):
        return (torch.sigmoid(t[..., :2]) + grid) * stride, torch.exp(torch.clamp(t[..., 2:], max=30.0)) * anchor


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free for large |x|


# ----------------------------------------------------------------------------- layer-list parser

_STRINGS = ("nc", "anchors", "None")


def _parse(cfg: Mapping, ch_in: int) -> tuple[list[nn.Module], list]:
    """Rows -> modules and their ``from`` indices. Strides follow the rows (no dry run needed for Detect)."""
    try:
        gd, gw = float(cfg["depth_multiple"]), float(cfg["width_multiple"])
        nc, anchors = int(cfg["nc"]), cfg["anchors"]
        rows = list(cfg["backbone"]) + list(cfg["head"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeslimError(f"YOLO layer dict is incomplete ({type(exc).__name__}: {exc}): it needs nc, "
                            "depth_multiple, width_multiple, anchors, backbone and head") from None
    ch: list[int] = []  # output channels and strides per row: what later rows' ``from`` refers to
    strides: list[float] = []
    layers: list[nn.Module] = []
    for i, row in enumerate(rows):
        try:
            m, c2, s2 = _build_row(i, row, len(rows), gd, gw, nc, anchors, ch or [ch_in], strides or [1.0])
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            raise EdgeslimError(f"YOLO row {i} {row!r} is malformed ({type(exc).__name__}: {exc}): "
                                "write it as [from, repeats, module, args]") from None
        layers.append(m)
        ch.append(c2)
        strides.append(s2)
    froms = [row[0] if isinstance(row[0], int) else list(row[0]) for row in rows]
    if not layers or not isinstance(layers[-1], Detect):
        raise EdgeslimError("YOLO layer list does not end with a Detect row: add it (from, 1, Detect, [nc, anchors])")
    return layers, froms


def _build_row(i: int, row: Sequence, n_rows: int, gd: float, gw: float, nc: int, anchors: object,
               ch: list[int], strides: list[float]) -> tuple[nn.Module, int, float]:
    """One row -> (module, output channels, output stride)."""
    f, n, name, args = row
    args = [{"nc": nc, "anchors": anchors, "None": None}[a] if a in _STRINGS else a for a in args]
    n = max(round(n * gd), 1) if n > 1 else n
    srcs = [f] if isinstance(f, int) else list(f)
    c_src, s_src = [ch[j] for j in srcs], [strides[j] for j in srcs]
    c1, s1 = c_src[0], s_src[0]
    if n > 1 and name != "C3":
        raise EdgeslimError(f"YOLO row {i} repeats {name} {n} times: only C3 rows take repeats here")
    if name in ("Conv", "DarkConv", "C3", "SPPF"):
        c2 = args[0] if name == "DarkConv" else _make_divisible(args[0] * gw, 8)
        if name == "C3":
            return C3(c1, c2, n, *args[1:]), c2, s1
        if name == "SPPF":
            return SPPF(c1, c2, *args[1:]), c2, s1
        if name == "DarkConv":
            return dark_conv(c1, c2, args[1]), c2, s1
        k, s, p = (list(args[1:]) + [1, 1, None][len(args) - 1:])[:3]
        return Conv(c1, c2, k, s, p), c2, s1 * s
    if name == "MaxPool":
        return nn.MaxPool2d(args[0], args[1]), c1, s1 * args[1]
    if name == "MaxPoolSame":
        return MaxPoolSame(args[0]), c1, s1
    if name == "nn.Upsample":
        return nn.Upsample(args[0], args[1], args[2]), c1, s1 / float(args[1])
    if name == "Concat":
        if len(set(s_src)) != 1:
            raise EdgeslimError(f"YOLO row {i}: Concat joins strides {s_src}: fix the layer list")
        return Concat(args[0]), sum(c_src), s1
    if name == "Detect" and i == n_rows - 1:
        return Detect(args[0], args[1], c_src, s_src), 0, s1
    raise EdgeslimError(f"YOLO row {i} uses module '{name}', which edgeslim does not define: supported are "
                        "Conv, C3, SPPF, nn.Upsample, Concat, Detect (last row), DarkConv, MaxPool, MaxPoolSame")


def _make_divisible(x: float, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _plain(obj: object) -> object:
    """Tuples -> lists, recursively, so layer dicts compare equal to the ones read from checkpoints."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
