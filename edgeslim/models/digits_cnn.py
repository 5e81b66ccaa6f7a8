"""A tiny CNN for the scikit-learn digits set (1x8x8 images, 10 classes).

It exists so the whole pipeline (train, calibrate, quantize, export) can be demonstrated
and tested on CPU in seconds with no downloads. It deliberately contains the patterns the
compression passes must handle on real networks: conv-BN-ReLU chains, a max pool, a
residual add, global average pooling and a linear head.

Input scaling: digits pixels are 0..16; the data layer divides by 16 to get [0, 1] and
then normalizes with the zoo's mean 0.5 / std 0.5, so the network sees roughly [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "digits_cnn"]


def _conv_bn(in_ch: int, out_ch: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)


class DigitsCNN(nn.Module):
    """conv16-conv32-pool-[conv32-conv32 + skip]-GAP-fc; about 24k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(1, 16)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv_bn(16, 32)
        self.relu2 = nn.ReLU(inplace=False)
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3, self.bn3 = _conv_bn(32, 32)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv4, self.bn4 = _conv_bn(32, 32)
        self.relu4 = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        y = self.relu3(self.bn3(self.conv3(x)))
        y = self.bn4(self.conv4(y))
        x = self.relu4(y + x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)
