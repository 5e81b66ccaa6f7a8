"""ShuffleNetV2 feature extractor (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018) with a width multiplier and a chosen number of stride-2 layers.

Used by ``edgeslim.algorithms.backbone`` as a light replacement backbone (TTA guideline G1). The layout follows
the reference implementation (megvii ``ShuffleNetV2``, also what ``fastestdet.ShuffleNetV2`` loads):
``first_conv`` 3x3 conv-BN-ReLU (-> 24 channels), a 3x3/2 max pool, then ``stage2..4`` of (4, 8, 4) units.

* A stage's **first unit** feeds its whole input to two branches and concatenates them: ``branch_proj``
  (3x3 depthwise conv-BN, 1x1 conv-BN-ReLU) and ``branch_main`` (1x1 conv-BN-ReLU, 3x3 depthwise conv-BN,
  1x1 conv-BN-ReLU). In the reference it always has stride 2; here it may have stride 1 (CIFAR-style
  schedules), which keeps the same two-branch form with the depthwise convs at stride 1.
* The **other units** split the channels into even / odd (the channel shuffle of the reference code), pass the
  even half through and concatenate it with ``branch_main`` of the odd half.

Stride-2 layers, in order: ``first_conv``, ``maxpool``, ``stage2``, ``stage3``, ``stage4`` (five, total stride
32: the ImageNet schedule). ``downsample=k`` keeps the **last** k of them and makes the earlier ones stride 1
(the max pool is dropped), as CIFAR adaptations do: ``k=3`` at 32x32 is the common CIFAR ShuffleNetV2
(stride-1 stem, no max pool, 4x4 output). The final 1x1 ``conv5`` (-> 1024) of the classifier is not
included: a backbone swap puts its own 1x1 adapter there, sized for the kept head.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import EdgeslimError

__all__ = ["STAGE_REPEATS", "STEM_CHANNELS", "WIDTH_CHANNELS", "MAX_DOWNSAMPLE", "ShuffleUnit", "stage_channels",
           "shufflenet_v2_backbone"]


STAGE_REPEATS = (4, 8, 4)
STEM_CHANNELS = 24
# output channels of stage2..4 for the published width multipliers (table 5 of the paper)
WIDTH_CHANNELS = {0.5: (48, 96, 192), 1.0: (116, 232, 464), 1.5: (176, 352, 704), 2.0: (244, 488, 976)}
MAX_DOWNSAMPLE = 5


def _conv_bn(c1: int, c2: int, k: int, s: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c2)]


class ShuffleUnit(nn.Module):
    """One ShuffleNetV2 unit; ``first`` selects the two-branch form that changes channels (see module doc)."""

    def __init__(self, inp: int, oup: int, stride: int, first: bool) -> None:
        super().__init__()
        self.first = first
        mid = oup // 2
        main_in = inp if first else oup // 2
        self.branch_main = nn.Sequential(
            *_conv_bn(main_in, mid, 1), nn.ReLU(),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            *_conv_bn(mid, oup - (inp if first else oup // 2), 1), nn.ReLU(),
        )
        if first:
            self.branch_proj = nn.Sequential(*_conv_bn(inp, inp, 3, stride, groups=inp), *_conv_bn(inp, inp, 1),
                                             nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:  # construction-time constant: fx traces it away
            return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)
        return torch.cat((x[:, 0::2], self.branch_main(x[:, 1::2])), 1)


def stage_channels(width: float) -> tuple[int, int, int]:
    """Stage output channels: the paper's table for 0.5 / 1.0 / 1.5 / 2.0, else 116 x 2^i x width rounded to 8."""
    if not width > 0:
        raise EdgeslimError(f"invalid ShuffleNetV2 width {width!r}: use a positive multiplier such as 0.5 or 1.0")
    if float(width) in WIDTH_CHANNELS:
        return WIDTH_CHANNELS[float(width)]
    return tuple(max(32, int(round(116 * 2 ** i * width / 8)) * 8) for i in range(3))  # type: ignore[return-value]


def shufflenet_v2_backbone(*, in_channels: int = 3, width: float = 1.0, downsample: int = MAX_DOWNSAMPLE
                           ) -> nn.Sequential:
    """ShuffleNetV2 up to ``stage4`` (no ``conv5``, pooling or classifier), randomly initialized.

    >>> net = shufflenet_v2_backbone(width=0.5, downsample=3)
    >>> net(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 192, 4, 4])
    """
    if not 0 <= downsample <= MAX_DOWNSAMPLE:
        raise EdgeslimError(f"ShuffleNetV2 has {MAX_DOWNSAMPLE} stride-2 layers; downsample={downsample} is out "
                            f"of range: use 0..{MAX_DOWNSAMPLE}")
    strided = [i >= MAX_DOWNSAMPLE - downsample for i in range(MAX_DOWNSAMPLE)]  # keep the last k
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["first_conv"] = nn.Sequential(*_conv_bn(in_channels, STEM_CHANNELS, 3, 2 if strided[0] else 1), nn.ReLU())
    if strided[1]:
        layers["maxpool"] = nn.MaxPool2d(3, 2, 1)
    c = STEM_CHANNELS
    for i, (n, out) in enumerate(zip(STAGE_REPEATS, stage_channels(width))):
        units = [ShuffleUnit(c, out, 2 if strided[2 + i] else 1, True)]
        units += [ShuffleUnit(out // 2, out, 1, False) for _ in range(n - 1)]
        layers[f"stage{i + 2}"] = nn.Sequential(*units)
        c = out
    net = nn.Sequential(layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net
