"""FastestDet (dog-qiuqiu 2022, BSD-3-Clause), written here from its weights and its ONNX graph.

Derived from ``fastestdet_coco_ap05-0.2532.pth`` (key names and shapes) and ``FastestDet.onnx`` (op order,
BN folded), so the published state_dict loads strictly:

* ``backbone``: ShuffleNetV2 (Ma et al. 2018) without its classifier: ``first_conv`` 3x3/2 conv-BN-ReLU
  (3 -> 24), 3x3/2 max pool, then stages of [4, 8, 4] ShuffleV2 blocks with outputs 48, 96, 192. A block's
  ``branch_main`` is 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU; stride-2 blocks add a
  ``branch_proj`` (3x3/2 depthwise conv-BN, 1x1 conv-BN-ReLU) and concat both branches; stride-1 blocks
  split the input's channels into even / odd (the channel shuffle), pass the even half through and
  concat it with ``branch_main`` of the odd half.
* ``neck`` (no parameters): the stride-8 stage (48 ch) average-pooled 3x3/2 (zero padding counted), the
  stride-16 stage (96 ch) and the stride-32 stage (192 ch) nearest-upsampled x2, concatenated (336 ch) at
  stride 16; then ``SPP``: 1x1 conv-BN-ReLU to 96, three branches of 1, 2 and 3 chained 5x5 depthwise
  conv-BN-ReLU, concatenated (288), 1x1 conv-BN, plus the 96-ch input, ReLU.
* ``detect_head``: 1x1 conv-BN-ReLU, then three ``Head`` branches (5x5 depthwise conv-BN-ReLU, 1x1 conv-BN)
  giving objectness (1), box regression (4) and classes (80) at stride 16: 22x22 cells at 352x352.

The ONNX graph applies ``Sigmoid`` to objectness and ``Softmax`` over the 80 class channels, leaves the
4 regression channels raw and concatenates them to (N, 85, 22, 22). Our ``forward`` stops before those
activations and returns ``(obj, reg, cls)`` raw (three tensors, so each gets its own quantization
scale); ``FastestDetDecoder`` applies them in numpy and decodes boxes as FastestDet's post-processing
does: ``cx = (tanh(reg0) + gx) * stride``, ``cy = (tanh(reg1) + gy) * stride``, ``w = sigmoid(reg2) * W``,
``h = sigmoid(reg3) * H`` (W, H: the input's size in pixels; no +0.5 cell offset), score
``obj^0.6 * cls^0.4``. On COCO128 val this decoding beats the +0.5 variant (mean top-5 IoU 0.66 vs 0.59).

Input: FastestDet was trained on OpenCV images, i.e. **BGR** channel order, pixels / 255, plain resize
(no letterbox) to 352x352.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EdgeslimError

__all__ = ["STAGE_REPEATS", "STAGE_CHANNELS", "ShuffleV2Block", "ShuffleNetV2", "Conv1x1", "PyramidConcat", "SPP",
           "Head", "DetectHead", "FastestDet", "fastestdet", "FastestDetDecoder", "FastestDetDecode"]


STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = (-1, 24, 48, 96, 192)


def _conv_bn(c1: int, c2: int, k: int, s: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c2)]


class ShuffleV2Block(nn.Module):
    def __init__(self, inp: int, oup: int, mid: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.branch_main = nn.Sequential(
            *_conv_bn(inp, mid, 1), nn.ReLU(),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            *_conv_bn(mid, oup - inp, 1), nn.ReLU(),
        )
        if stride == 2:
            self.branch_proj = nn.Sequential(*_conv_bn(inp, inp, 3, 2, groups=inp), *_conv_bn(inp, inp, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:  # channel shuffle: even channels pass through, odd ones feed branch_main
            return torch.cat((x[:, 0::2], self.branch_main(x[:, 1::2])), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


class ShuffleNetV2(nn.Module):
    """Returns the three stage outputs (strides 8, 16, 32)."""

    def __init__(self, repeats: Sequence[int] = STAGE_REPEATS, channels: Sequence[int] = STAGE_CHANNELS) -> None:
        super().__init__()
        c = channels[1]
        self.first_conv = nn.Sequential(*_conv_bn(3, c, 3, 2), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (n, out) in enumerate(zip(repeats, channels[2:])):
            blocks = [ShuffleV2Block(c if j == 0 else out // 2, out, out // 2, 2 if j == 0 else 1) for j in range(n)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*blocks))
            c = out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.first_conv(x))
        p1 = self.stage2(x)
        p2 = self.stage3(p1)
        return p1, p2, self.stage4(p2)


class Conv1x1(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv1x1 = nn.Sequential(*_conv_bn(c1, c2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x)


def _dw5_chain(c: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [*_conv_bn(c, c, 5, groups=c), nn.ReLU()]
    return nn.Sequential(*layers)


class PyramidConcat(nn.Module):
    """Brings the three stages to stride 16 (3x3/2 average pool, x2 nearest upsample) and concatenates them."""

    def __init__(self) -> None:
        super().__init__()
        self.avg_pool = nn.AvgPool2d(3, 2, 1)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.avg_pool(p1), p2, self.upsample(p3)), 1)


class SPP(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.Conv1x1 = Conv1x1(c1, c2)
        self.S1, self.S2, self.S3 = _dw5_chain(c2, 1), _dw5_chain(c2, 2), _dw5_chain(c2, 3)
        self.output = nn.Sequential(*_conv_bn(3 * c2, c2, 1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv1x1(x)
        y = torch.cat((self.S1(x), self.S2(x), self.S3(x)), 1)
        return self.relu(x + self.output(y))


class Head(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv5x5 = nn.Sequential(*_conv_bn(c1, c1, 5, groups=c1), nn.ReLU(), *_conv_bn(c1, c2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv5x5(x)


class DetectHead(nn.Module):
    def __init__(self, c: int, nc: int) -> None:
        super().__init__()
        self.conv1x1 = Conv1x1(c, c)
        self.obj_layers, self.reg_layers, self.cls_layers = Head(c, 1), Head(c, 4), Head(c, nc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv1x1(x)
        return self.obj_layers(x), self.reg_layers(x), self.cls_layers(x)


class FastestDet(nn.Module):
    """FastestDet; ``forward`` returns raw ``(obj (N,1,H,W), reg (N,4,H,W), cls (N,nc,H,W))`` at stride 16."""

    stride = 16

    def __init__(self, nc: int = 80) -> None:
        super().__init__()
        self.nc = nc
        self.backbone = ShuffleNetV2()
        self.neck = PyramidConcat()  # no parameters: the checkpoint's keys stay backbone / SPP / detect_head
        self.SPP = SPP(sum(STAGE_CHANNELS[2:]), STAGE_CHANNELS[-2])
        self.detect_head = DetectHead(STAGE_CHANNELS[-2], nc)
        self.groups = {"backbone": ["backbone.*"], "neck": ["neck.*", "SPP.*"], "head": ["detect_head.*"]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p1, p2, p3 = self.backbone(x)
        return self.detect_head(self.SPP(self.neck(p1, p2, p3)))

    def make_decoder(self) -> FastestDetDecoder:
        return FastestDetDecoder(self.nc, self.stride)


def fastestdet(nc: int = 80) -> FastestDet:
    """FastestDet with random weights (237k parameters); load the published .pth with ``load_weights``."""
    return FastestDet(nc)


class FastestDetDecoder:
    """Raw ``(obj, reg, cls)`` -> ``(N, H*W, 4 + nc)``: x1, y1, x2, y2 in input pixels, then per-class
    scores ``sigmoid(obj)^0.6 * softmax(cls)^0.4`` (FastestDet's score; its argmax is the softmax's).

    Also accepts one already-concatenated raw ``(N, 5 + nc, H, W)`` array. ``activate`` gives what the
    published ONNX model outputs (sigmoid obj, raw reg, softmax cls, concatenated); ``activated=True`` decodes
    that output directly (``FastestDet.onnx`` imported with ``--decoder fastestdet-activated``).

    >>> FastestDetDecoder(80)([np.zeros((1, 1, 22, 22)), np.zeros((1, 4, 22, 22)), np.zeros((1, 80, 22, 22))]).shape
    (1, 484, 84)
    """

    def __init__(self, nc: int = 80, stride: int = 16, activated: bool = False) -> None:
        self.nc, self.stride, self.activated = int(nc), int(stride), bool(activated)

    def activate(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        raw = self._raw(outputs)
        if self.activated:  # the published ONNX file's output: sigmoid / softmax already applied
            return raw
        cls = raw[:, 5:] - raw[:, 5:].max(1, keepdims=True)
        cls = np.exp(cls)
        cls /= cls.sum(1, keepdims=True)
        return np.concatenate((_sigmoid(raw[:, :1]), raw[:, 1:5], cls), 1)

    def __call__(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        p = self.activate(outputs)
        n, _, h, w = p.shape
        gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        cx = (np.tanh(p[:, 1]) + gx) * self.stride
        cy = (np.tanh(p[:, 2]) + gy) * self.stride
        bw, bh = _sigmoid(p[:, 3]) * (w * self.stride), _sigmoid(p[:, 4]) * (h * self.stride)
        boxes = np.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), 1)
        scores = p[:, :1] ** 0.6 * p[:, 5:] ** 0.4
        out = np.concatenate((boxes, scores), 1).astype(np.float32)  # (n, 4 + nc, h, w)
        return out.reshape(n, 4 + self.nc, h * w).transpose(0, 2, 1)

    def module(self) -> nn.Module:
        """The decoding as a torch module for the ONNX graph: raw (obj, reg, cls) -> ``(N, H*W, 5 + nc)``: cx, cy,
        w, h in input pixels, ``sigmoid(obj)^0.6``, ``softmax(cls)^0.4`` (so that score = obj * cls as above)."""
        return FastestDetDecode(self)

    def _raw(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        arrays = [np.asarray(o, dtype=np.float32) for o in outputs]
        raw = np.concatenate(arrays, 1) if len(arrays) > 1 else arrays[0]
        if raw.ndim != 4 or raw.shape[1] != 5 + self.nc:
            raise EdgeslimError(f"FastestDet decoder expects (obj, reg, cls) with 1 + 4 + {self.nc} channels, got "
                                f"{[a.shape for a in arrays]}: pass the model's three outputs in order")
        return raw


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


class FastestDetDecode(nn.Module):
    """``FastestDetDecoder`` in torch (see ``FastestDetDecoder.module``)."""

    def __init__(self, decoder: FastestDetDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, *outputs: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        raw = torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]
        if dec.activated:
            obj, cls = raw[:, :1], raw[:, 5:]
        else:
            obj, cls = torch.sigmoid(raw[:, :1]), torch.softmax(raw[:, 5:], 1)
        _, _, h, w = raw.shape
        gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        cx = (torch.tanh(raw[:, 1]) + gx) * dec.stride
        cy = (torch.tanh(raw[:, 2]) + gy) * dec.stride
        bw, bh = torch.sigmoid(raw[:, 3]) * (w * dec.stride), torch.sigmoid(raw[:, 4]) * (h * dec.stride)
        out = torch.cat((torch.stack((cx, cy, bw, bh), 1), obj ** 0.6, cls ** 0.4), 1)  # (n, 5 + nc, h, w)
        return out.reshape(-1, 5 + dec.nc, h * w).permute(0, 2, 1)
