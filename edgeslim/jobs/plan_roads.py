"""The quantization roads ``edgeslim plan`` tries before any structural step, and what each one stores.

A road is a way to deploy the current structure without changing it: W8A8 round-to-nearest (G3), fewer weight
bits with learned rounding (AdaRound / BRECQ, G3), mixed precision by sensitivity (G4), whole-model FP16 (G4).
Roads are listed cheapest first (time to produce, then accuracy risk); the planner takes the first that meets
the target. Sizes are what the target stores: sub-8-bit weights packed (k bits each) only when the target's
format packs them (``Target.packed_weights``), else in int8 containers, as in the ONNX QDQ file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..targets import Target

__all__ = ["LOW_BITS", "Road", "quant_roads", "container_bits", "weight_layers", "int_weight_bytes", "graph_bytes",
           "predicted_bytes"]


LOW_BITS = (6, 4)  # weight widths below 8 tried in this order (activations stay 8-bit)


@dataclass(frozen=True)
class Road:
    step: str  # the guideline step it belongs to (G3 / G4): ``--steps`` filters on it
    fmt: str  # int8 | mixed | fp16
    w_bits: int = 8
    method: str | None = None  # None: round-to-nearest; "adaround" / "brecq": learned rounding

    @property
    def label(self) -> str:
        if self.fmt == "fp16":
            return "FP16"
        base = f"W{self.w_bits}A8" + (f" {self.method}" if self.method else "")
        return f"mixed W{self.w_bits}A8+" + (f" {self.method}" if self.method else "") if self.fmt == "mixed" else base


def quant_roads(target: Target, method: str) -> list[Road]:
    """Every road in cost order: W8A8, W6A8 / W4A8 with ``method``, mixed precision, FP16."""
    roads = []
    if target.int8:
        roads.append(Road("G3", "int8", 8))
        roads += [Road("G3", "int8", b, method) for b in LOW_BITS]
        low = min(LOW_BITS) if target.packed_weights else 8
        roads.append(Road("G4", "mixed", low, method if low < 8 else None))
    roads.append(Road("G4", "fp16", 16))
    return roads


def container_bits(w_bits: int, target: Target) -> int:
    """Bits one stored weight takes on ``target``: packed k bits, or an int8 container."""
    if w_bits > 8:
        return w_bits
    return w_bits if target.packed_weights else 8


def weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def int_weight_bytes(model: nn.Module, bits: int, sparse: bool = False) -> int:
    """Stored bytes of ``model`` quantized with ``bits`` per weight (BN folded: one int32 bias per output channel),
    dense or in the smallest exact sparse format; computed from the float model before quantizing."""
    from ..algorithms.pruning import sparse_size_bytes

    total = 0
    for m in weight_layers(model):
        w = m.weight.detach()
        if sparse:
            total += int(sparse_size_bytes({"w": w}, value_bits=bits).rows[0].bytes)
        else:
            total += (w.numel() * bits + 7) // 8
        total += 4 * (m.out_channels if hasattr(m, "out_channels") else m.out_features)
    return total


def graph_bytes(graph, target: Target, sparse: bool = False) -> int:
    """Stored bytes of a lowered ``IntGraph`` on ``target``: integer weights at their container width (sparse
    formats counted on the integer values themselves), int32 biases, float weights of FP16 / FP32 layers."""
    from ..algorithms.pruning import sparse_size_bytes

    total = 0
    for node in graph.nodes:
        a = node.arrays
        if "w" in a:
            bits = container_bits(node.attrs["w_bits"], target)
            if sparse:
                total += int(sparse_size_bytes({"w": torch.from_numpy(np.asarray(a["w"], np.int32))},
                                               value_bits=bits).rows[0].bytes)
            else:
                total += (a["w"].size * bits + 7) // 8
        if "bias" in a:
            total += a["bias"].size * 4
        total += sum(a[k].nbytes for k in ("w_float", "b_float") if k in a)
    return total


def predicted_bytes(road: Road, model: nn.Module, target: Target, sparse: bool) -> int | None:
    """What ``road`` will store for ``model`` (None for mixed precision: the search decides)."""
    if road.fmt == "mixed":
        return None
    if road.fmt == "fp16":
        from ..algorithms.pruning import sparse_size_bytes

        if sparse:
            return int(sum(r.bytes for r in sparse_size_bytes(model, value_bits=16).rows))
        return 2 * sum(p.numel() for p in model.parameters())
    return int_weight_bytes(model, container_bits(road.w_bits, target), sparse)
