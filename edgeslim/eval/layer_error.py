"""Per-layer quantization error: each quantized activation compared with the float model's, as SQNR."""

from __future__ import annotations

import torch
from torch import fx

from ..algorithms import ptq
from ..graph import ops
from ..quant.modules import ActQuant
from ..quant.primitives import sqnr_db

__all__ = ["layer_errors"]


def layer_errors(gm: fx.GraphModule, x: torch.Tensor) -> list[dict]:
    """One row per activation quantizer, in graph order: the producing layer, qparams and SQNR (dB).

    The SQNR is end to end up to that tensor (quantized model vs float model on the same images), so
    it shows where along the network the error builds up.
    """
    names = {n.target: _producer(gm, n) for n in gm.graph.nodes if ops.kind(gm, n) == "quant"}
    captured: dict[str, dict[str, torch.Tensor]] = {"off": {}, "quant": {}}
    mode = ["off"]
    hooks = [m.register_forward_hook(lambda mod, i, o, key=k: captured[mode[0]].__setitem__(key, o.detach()))
             for k, m in gm.named_modules() if isinstance(m, ActQuant)]
    try:
        with torch.no_grad():
            for m in ("off", "quant"):
                mode[0] = m
                with ptq.mode(gm, m):
                    gm(x)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for key, producer in names.items():
        q: ActQuant = gm.get_submodule(key)
        rows.append({"tensor": producer, "quantizer": key, "bits": q.spec.bits, "scale": float(q.scale),
                     "zero_point": int(q.zero_point), "signed": q.signed,
                     "sqnr_db": sqnr_db(captured["off"][key], captured["quant"][key])})
        w = _weight_sqnr(gm, producer)
        if w is not None:  # the layer's own weight error, next to the activation error built up to its output
            rows[-1]["weight_sqnr_db"] = w
    return rows


def _weight_sqnr(gm: fx.GraphModule, name: str) -> float | None:
    """SQNR (dB) of a quantized conv / linear's fake-quant weights vs its float weights (None: no such layer)."""
    try:
        mod = gm.get_submodule(name)
    except AttributeError:
        return None
    if not hasattr(mod, "fq_weight") or getattr(getattr(mod, "spec", None), "is_float", True):
        return None
    with torch.no_grad():
        return sqnr_db(mod.weight, mod.fq_weight())


def _producer(gm: fx.GraphModule, node: fx.Node) -> str:
    src = node.args[0]
    return str(src.target) if src.op == "call_module" else src.name
