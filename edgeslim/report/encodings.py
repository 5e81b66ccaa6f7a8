"""``encodings.json``: every quantized tensor's bits, scale and zero point, from the IntGraph."""

from __future__ import annotations

from ..intgraph import IntGraph

__all__ = ["encodings"]


def encodings(g: IntGraph) -> dict:
    acts = {name: q.to_dict() for name, q in g.qparams.items()}
    params = {}
    for node in g.layers():
        a = node.arrays
        layer = node.attrs.get("module", node.name)
        params[f"{layer}.weight"] = {"bits": node.attrs["w_bits"], "signed": True,
                                     "per_channel": node.attrs["per_channel"],
                                     "scale": a["w_scale"].tolist(), "zero_point": a["w_zero_point"].tolist()}
        if "bias" in a:
            in_scale = g.qparams[node.inputs[0]].scale
            params[f"{layer}.bias"] = {"bits": 32, "signed": True, "zero_point": 0,
                                       "scale": (in_scale * a["w_scale"].astype(float)).tolist()}
        if "multiplier" in a:
            params[f"{layer}.requant"] = {"multiplier": a["multiplier"].tolist(), "m0": a["m0"].tolist(),
                                          "shift": a["shift"].tolist()}
    return {"activations": acts, "parameters": params}
