"""Empirical bias correction (Nagel et al. 2019, section 4.2, the empirical variant; AIMET's "empirical bias
correction").

Quantizing weights (and the inputs a layer sees) shifts the *mean* of its outputs: ``E[W_q x_q] != E[W x]``.
That shift is a per-output-channel constant, so it can be absorbed into the bias. Layers are corrected in graph
order on the calibration images: for layer ``L`` the float model's pre-activation mean (every quantizer off,
measured once before any correction) and the quantized model's (layers before ``L`` already corrected) are
compared, and the difference becomes ``L``'s ``bias_delta``, which only the quantized layer adds to its bias
(``QuantConv2d.quant_bias``): the float reference stays the FP32 model, and the int32 bias the device stores
follows at export. Runs after ``ptq.freeze``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import fx, nn
from tqdm import tqdm

from ..graph import ops
from ..quant.modules import QuantConv2d
from . import ptq

__all__ = ["correct_bias"]


def _pre_activation(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, QuantConv2d):
        return mod._conv_forward(x, mod.fq_weight(), mod.fq_bias())
    return nn.functional.linear(x, mod.fq_weight(), mod.fq_bias())


def _channel_means(gm: fx.GraphModule, mods: list[nn.Module],
                   batches: Callable[[], Iterable[torch.Tensor]]) -> list[torch.Tensor]:
    """Mean over images and positions of each module's pre-activation output, in the model's current mode."""
    captured: dict[int, torch.Tensor] = {}
    totals: list[torch.Tensor | None] = [None] * len(mods)
    counts = [0] * len(mods)
    handles = [m.register_forward_pre_hook(lambda _m, inputs, i=i: captured.__setitem__(i, inputs[0]))
               for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            for x in batches():
                captured.clear()
                gm(x)
                for i, m in enumerate(mods):
                    y = _pre_activation(m, captured[i])
                    s = y.sum(dim=[d for d in range(y.dim()) if d != 1])
                    totals[i] = s if totals[i] is None else totals[i] + s
                    counts[i] += y.numel() // y.shape[1]
    finally:
        for h in handles:
            h.remove()
    return [t / max(c, 1) for t, c in zip(totals, counts)]


def correct_bias(gm: fx.GraphModule, batches: Callable[[], Iterable[torch.Tensor]], *,
                 progress: bool = False) -> dict[str, float]:
    """Correct every integer-weight conv / linear layer in place; returns the largest |shift| removed per layer."""
    layers = [(str(n.target), ops.module(gm, n)) for n in ptq.weighted_nodes(gm)]
    layers = [(name, m) for name, m in layers if not m.spec.is_float]
    with ptq.mode(gm, "off"):
        float_means = _channel_means(gm, [m for _, m in layers], batches)  # the FP32 model, before any correction
    shifts = {}
    for (name, mod), float_mean in tqdm(list(zip(layers, float_means)), desc="bias correction", unit="layer",
                                        disable=not progress, leave=False):
        (quant_mean,) = _channel_means(gm, [mod], batches)
        delta = (float_mean - quant_mean).detach()
        mod.add_bias_correction(delta)
        shifts[name] = float(delta.abs().max())
    return shifts
