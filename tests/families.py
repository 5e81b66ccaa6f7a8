"""Small synthetic models of the families users bring (seeded, random weights), written the way public ONNX
files write them: face detectors that decode boxes in the graph, a landmark regressor with PReLU, an
anchor-free detector with SiLU spelled ``x * sigmoid(x)``, a channel-shuffle network, a pixel-shuffle
super-resolution net, and a head with bilinear resizing and several outputs.

Shared by the fast tests (``tests/cli/test_any_model.py``) and the bench (``bench/any_model.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin, cout, k=3, s=1, act="relu", groups=1):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    layers += {"relu": [nn.ReLU()], "prelu": [nn.PReLU(cout)], "leaky": [nn.LeakyReLU(0.1)], "none": []}[act]
    return nn.Sequential(*layers)


class FaceDetector(nn.Module):
    """Two-scale anchor-based face detector (UltraFace / RetinaFace style) with the box decoding in the graph:
    scores by softmax over two classes, boxes as ``center + delta * var * size`` and ``exp`` for sizes."""

    def __init__(self, anchors_per_cell: int = 2) -> None:
        super().__init__()
        self.a = anchors_per_cell
        self.body1 = nn.Sequential(_cbr(3, 8, s=2), _cbr(8, 16, s=2), _cbr(16, 16, act="leaky"))
        self.body2 = nn.Sequential(_cbr(16, 24, s=2), _cbr(24, 24))
        self.cls = nn.ModuleList([nn.Conv2d(16, 2 * self.a, 3, padding=1), nn.Conv2d(24, 2 * self.a, 3, padding=1)])
        self.reg = nn.ModuleList([nn.Conv2d(16, 4 * self.a, 3, padding=1), nn.Conv2d(24, 4 * self.a, 3, padding=1)])

    def forward(self, x):
        f1 = self.body1(x)
        f2 = self.body2(f1)
        scores, boxes = [], []
        for f, cls, reg in zip((f1, f2), self.cls, self.reg):
            n, _, h, w = f.shape
            scores.append(cls(f).permute(0, 2, 3, 1).reshape(n, -1, 2))
            boxes.append(reg(f).permute(0, 2, 3, 1).reshape(n, -1, 4))
        scores = F.softmax(torch.cat(scores, 1), dim=-1)
        loc = torch.cat(boxes, 1)
        priors = self.priors.to(x.dtype)
        centers = priors[:, :2] + loc[..., :2] * 0.1 * priors[:, 2:]
        sizes = priors[:, 2:] * torch.exp(loc[..., 2:] * 0.2)
        return scores, torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)

    def init_priors(self, size: int) -> "FaceDetector":
        rows = []
        for stride in (4, 8):
            cells = size // stride
            for i in range(cells):
                for j in range(cells):
                    for k in range(self.a):
                        s = (k + 1) * stride * 2 / size
                        rows.append([(j + 0.5) / cells, (i + 0.5) / cells, s, s])
        self.register_buffer("priors", torch.tensor(rows))
        return self


class LandmarkRegressor(nn.Module):
    """PReLU backbone, global pooling and a linear layer regressing 5 (x, y) landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16, s=2, act="prelu"), _cbr(16, 16, groups=16, act="prelu"),
                                  _cbr(16, 32, k=1, act="prelu"), _cbr(32, 32, s=2, act="prelu"))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)).view(-1, 5, 2)


class AnchorFree(nn.Module):
    """YOLOX / YOLOv8-style: SiLU written as ``x * sigmoid(x)``, a nearest 2x upsample, an FPN concat and
    a head whose outputs are concatenated with sigmoid scores (decoding left to the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = _cbr(3, 16, s=2, act="none")
        self.c2 = _cbr(16, 32, s=2, act="none")
        self.c3 = _cbr(32, 32, s=2, act="none")
        self.lat = _cbr(48, 16, k=1, act="none")
        self.head = nn.Conv2d(16, 4 + 1 + 3, 1)

    @staticmethod
    def silu(x):
        return x * torch.sigmoid(x)

    def forward(self, x):
        p2 = self.silu(self.c2(self.silu(self.c1(x))))
        p3 = self.silu(self.c3(p2))
        up = F.interpolate(p3, scale_factor=2.0, mode="nearest")
        y = self.head(self.silu(self.lat(torch.cat([p2, up[:, :16]], 1))))
        box, obj_cls = y[:, :4], torch.sigmoid(y[:, 4:])
        out = torch.cat([box, obj_cls], 1)
        return out.flatten(2).permute(0, 2, 1)


class ShuffleNet(nn.Module):
    """ShuffleNetV2-style blocks: split, channel shuffle (reshape -> transpose -> reshape), depthwise convs,
    hard-swish written as ``x * hardsigmoid(x)``, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 24, s=2)
        self.b1 = nn.Sequential(_cbr(12, 12, k=1), _cbr(12, 12, groups=12, act="none"), _cbr(12, 12, k=1))
        self.b2 = nn.Sequential(_cbr(12, 12, k=1), _cbr(12, 12, groups=12, act="none"), _cbr(12, 12, k=1))
        self.fc = nn.Linear(24, 10)

    @staticmethod
    def shuffle(x, groups=2):
        n, c, h, w = x.shape
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        for b in (self.b1, self.b2):
            a, c = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat([a, b(c)], 1))
        x = x * F.hardsigmoid(x)
        return self.fc(x.mean((2, 3)))


class PixelShuffleSR(nn.Module):
    """ESPCN-style 2x super-resolution on one luminance channel: convs, pixel shuffle (DepthToSpace),
    a bilinear skip added to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.Tanh(), nn.Conv2d(16, 8, 3, padding=1), nn.Tanh(),
                                  nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return F.pixel_shuffle(self.body(x), 2) + up


class SegHead(nn.Module):
    """Two outputs: a bilinear-resized segmentation map at a non-integer size and a clipped (ReLU6) score."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16, s=2), _cbr(16, 16, s=2))
        self.seg = nn.Conv2d(16, 3, 1)
        self.score = nn.Linear(16, 1)

    def forward(self, x):
        f = self.body(x)
        seg = F.interpolate(self.seg(f), size=(x.shape[2] * 3 // 4, x.shape[3] * 3 // 4), mode="bilinear",
                            align_corners=False)
        return seg, torch.clamp(self.score(f.mean((2, 3))) + 3.0, 0.0, 6.0)


FAMILIES = {  # name -> (factory, input shape C, H, W)
    "face_detector": (lambda: FaceDetector().init_priors(64), (3, 64, 64)),
    "landmarks": (LandmarkRegressor, (3, 48, 48)),
    "anchor_free": (AnchorFree, (3, 64, 64)),
    "shufflenet": (ShuffleNet, (3, 32, 32)),
    "pixel_shuffle": (PixelShuffleSR, (1, 24, 24)),
    "seg_two_outputs": (SegHead, (3, 32, 32)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The family's model with seeded random weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(FAMILIES[name][0]())


def randomize_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affine parameters away from their init (fresh BNs make a random network's output ~0)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.6, 1.4)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def export(name: str, path: Path, *, batch: int | None = None, seed: int = 0) -> Path:
    """The family's model as an FP32 ONNX file (opset 17) as public exporters write it: dynamic batch, or a
    fixed batch (``batch=1``) when the exporter traced the reshapes at batch 1."""
    model = build(name, seed)
    shape = FAMILIES[name][1]
    x = torch.zeros(batch or 2, *shape)
    with torch.no_grad():
        y = model(x)
    outs = [f"out{i}" for i in range(len(y))] if isinstance(y, tuple) else ["out"]
    dyn = None if batch else {"images": {0: "N"}, **{o: {0: "N"} for o in outs}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"], output_names=outs,
                          opset_version=17, dynamic_axes=dyn)
    return path
