"""Tiny seeded models and data shared by the fast tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyResNet(nn.Module):
    """Conv-BN-ReLU, a residual block with an option-A shortcut, max pool, GAP, linear: every op kind."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.b3(self.c3(x)) + shortcut)
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TinyResNet().eval()
    for bn in (m.b1, m.b2, m.b3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return m


@pytest.fixture
def tiny_model() -> nn.Module:
    return make_tiny_resnet()


@pytest.fixture
def tiny_calib() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))

