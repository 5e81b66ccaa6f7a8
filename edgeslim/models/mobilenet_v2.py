"""MobileNetV2 (Sandler et al. 2018), width 1.0, written here rather than imported.

Parameter names follow the common torchvision layout (``features.N.conv.K...``,
``classifier.1``) so public ImageNet state_dicts load strictly without torchvision:

* ``features.0`` and ``features.18`` are conv-BN-ReLU6 triples (``.0`` conv, ``.1`` BN);
* ``features.1..17`` are inverted residual blocks whose ``conv`` Sequential holds
  [expand conv-BN-ReLU6 (omitted when t=1)], depthwise conv-BN-ReLU6, project conv, BN.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EdgeslimError

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "mobilenet_v2", "MAX_DOWNSAMPLE", "mobilenet_v2_backbone"]


# (expansion t, output channels c, repeats n, first stride s), from table 2 of the paper.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BN -> ReLU6; a Sequential so names are ``.0`` / ``.1`` / ``.2``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup  # fixed at build time: traceable
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch, last_ch = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        features.append(ConvBNReLU6(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


MAX_DOWNSAMPLE = 5  # stride-2 layers: the stem and the first block of the 24, 32, 64 and 160 channel stages


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of 8, never below 90% of it (the reference width rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenet_v2_backbone(*, in_channels: int = 3, width: float = 1.0, downsample: int = MAX_DOWNSAMPLE
                          ) -> nn.Sequential:
    """MobileNetV2's ``features`` without the last 1x1 conv (-> 1280), at a width multiplier, randomly initialized.

    ``downsample=k`` keeps the **last** k of the five stride-2 layers and gives the earlier ones stride 1:
    ``k=5`` is the ImageNet schedule (total stride 32), ``k=3`` at 32x32 the common CIFAR variant (stride-1
    stem and 24-channel stage, 4x4 output). A backbone swap replaces the dropped 1x1 conv by its own adapter.

    >>> mobilenet_v2_backbone(width=0.5, downsample=2)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 160, 8, 8])
    """
    if not width > 0:
        raise EdgeslimError(f"invalid MobileNetV2 width {width!r}: use a positive multiplier such as 0.5 or 1.0")
    if not 0 <= downsample <= MAX_DOWNSAMPLE:
        raise EdgeslimError(f"MobileNetV2 has {MAX_DOWNSAMPLE} stride-2 layers; downsample={downsample} is out "
                            f"of range: use 0..{MAX_DOWNSAMPLE}")
    slot = iter(i >= MAX_DOWNSAMPLE - downsample for i in range(MAX_DOWNSAMPLE))  # keep the last k
    in_ch = _make_divisible(32 * width)
    features: list[nn.Module] = [ConvBNReLU6(in_channels, in_ch, stride=2 if next(slot) else 1)]
    for t, c, n, s in _SETTINGS:
        out = _make_divisible(c * width)
        for i in range(n):
            stride = (2 if next(slot) else 1) if (i == 0 and s == 2) else 1
            features.append(InvertedResidual(in_ch, out, stride, t))
            in_ch = out
    net = nn.Sequential(*features)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net
