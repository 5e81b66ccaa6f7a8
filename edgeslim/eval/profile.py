"""Per-layer parameters, MACs and sizes of a captured model (``edgeslim inspect``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import fx, nn

from ..graph import ops

__all__ = ["LayerProfile", "profile"]


@dataclass(frozen=True)
class LayerProfile:
    name: str
    op: str
    out_shape: tuple[int, ...]
    params: int
    macs: int

    @property
    def fp32_bytes(self) -> int:
        return self.params * 4


def profile(gm: fx.GraphModule) -> list[LayerProfile]:
    """One row per weighted layer (conv / linear / BN), MACs for a batch of one (shapes from ``capture``)."""
    rows = []
    for node in gm.graph.nodes:
        mod = ops.module(gm, node)
        if mod is None or not any(True for _ in mod.parameters(recurse=True)):
            continue
        params = sum(p.numel() for p in mod.parameters())
        out_shape = node.meta.get("shape") or ()
        conv = getattr(mod, "conv", mod)
        if isinstance(conv, nn.Conv2d):
            kh, kw = conv.kernel_size
            macs = int(np.prod(out_shape[1:])) * (conv.in_channels // conv.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            macs = int(np.prod(out_shape[1:-1] or (1,))) * mod.in_features * mod.out_features
        else:
            macs = 0
        rows.append(LayerProfile(str(node.target), type(mod).__name__, tuple(out_shape), params, macs))
    return rows
