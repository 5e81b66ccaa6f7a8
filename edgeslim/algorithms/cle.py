"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, section 4.1).

For two convolutions joined by a ReLU, ``y = W2 relu(W1 x + b1)``, ReLU's positive homogeneity lets each
intermediate channel ``i`` be rescaled: ``W1[i] / s_i``, ``b1[i] / s_i``, ``W2[:, i] * s_i`` compute the same
function. With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|`` the choice ``s_i = sqrt(r1_i / r2_i)`` makes
both ranges ``sqrt(r1_i * r2_i)``, so per-tensor weight quantization no longer wastes its grid on the few
channels with large ranges. Runs on the BN-folded, fused float graph (``ConvAct`` + the next conv) before
quantizers are inserted; a pair is equalized only when the intermediate tensor has no other reader (a
residual add reading it would see the rescaled values) and the activation is ReLU (ReLU6's clip at 6 is not
scale-invariant). ``iterations`` repeats the sweep, as the paper does for chains of more than two layers.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..graph import ops
from ..quant.modules import ConvAct

__all__ = ["equalizable_pairs", "equalize"]


def equalizable_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(first conv, second conv) module names joined by a ReLU with no other reader of the middle tensor."""
    pairs = []
    for node in gm.graph.nodes:
        first = ops.module(gm, node)
        if not isinstance(first, ConvAct) or first.act != "relu" or len(node.users) != 1:
            continue
        (user,) = node.users
        second = ops.module(gm, user)
        conv2 = second.conv if isinstance(second, ConvAct) else second
        if type(conv2) is not nn.Conv2d or conv2.groups != 1 or first.conv.groups != 1:
            continue
        if conv2.in_channels != first.conv.out_channels:
            continue
        pairs.append((str(node.target), str(user.target)))
    return pairs


def _conv(mod: nn.Module) -> nn.Conv2d:
    return mod.conv if isinstance(mod, ConvAct) else mod


def equalize(gm: fx.GraphModule, *, iterations: int = 2, eps: float = 1e-8) -> fx.GraphModule:
    """Equalize every ``equalizable_pairs`` pair in place; the model computes the same function."""
    pairs = equalizable_pairs(gm)
    with torch.no_grad():
        for _ in range(iterations):
            for a, b in pairs:
                c1, c2 = _conv(gm.get_submodule(a)), _conv(gm.get_submodule(b))
                r1 = c1.weight.abs().reshape(c1.out_channels, -1).amax(dim=1)
                r2 = c2.weight.abs().transpose(0, 1).reshape(c2.in_channels, -1).amax(dim=1)
                s = torch.where((r1 > eps) & (r2 > eps), torch.sqrt(r1 / r2.clamp_min(eps)), torch.ones_like(r1))
                c1.weight.div_(s.reshape(-1, 1, 1, 1))
                if c1.bias is not None:
                    c1.bias.div_(s)
                c2.weight.mul_(s.reshape(1, -1, 1, 1))
    return gm
