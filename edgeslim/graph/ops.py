"""What each fx node *is*, in one flat table per role (style rule 7).

``kind(gm, node)`` names a node's role in quantization:
* ``conv`` / ``linear``: weighted compute, output gets its own quantizer;
* ``add`` / ``cat`` / ``avgpool``: integer compute that requantizes (QLinearAdd / QLinearConcat / pooling);
* ``act``: ReLU / ReLU6, fused into the producer's output quantizer or requantized when fusion is off;
* ``pass``: data movement that keeps its input's scale (max pool, slicing, zero padding, flatten, dropout);
* ``quant``: an ``ActQuant`` inserted by edgeslim;
* ``float``: anything else, which stays FP32 (reported as a float island).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.modules import ActQuant, ConvAct, QuantConv2d, QuantLinear

MODULE_KINDS: dict[type, str] = {
    nn.Conv2d: "conv",
    ConvAct: "conv",
    QuantConv2d: "conv",
    nn.Linear: "linear",
    QuantLinear: "linear",
    nn.ReLU: "act",
    nn.ReLU6: "act",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.MaxPool2d: "pass",
    nn.Flatten: "pass",
    nn.Identity: "pass",
    nn.Dropout: "pass",
    ActQuant: "quant",
}

FUNCTION_KINDS: dict[object, str] = {
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    torch.cat: "cat",
    torch.concat: "cat",
    F.relu: "act",
    torch.relu: "act",
    F.relu6: "act",
    F.adaptive_avg_pool2d: "avgpool",
    F.avg_pool2d: "avgpool",
    F.max_pool2d: "pass",
    torch.flatten: "pass",
    operator.getitem: "pass",
    F.pad: "pass",
    F.dropout: "pass",
}

METHOD_KINDS: dict[str, str] = {
    "relu": "act",
    "relu_": "act",
    "add": "add",
    "add_": "add",
    "flatten": "pass",
    "view": "pass",
    "reshape": "pass",
    "size": "meta",
    "mean": "avgpool",
}


def kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """The role of ``node`` (see the module docstring); ``placeholder`` / ``output`` / ``meta`` for the rest."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        return MODULE_KINDS.get(type(gm.get_submodule(node.target)), "float")
    if node.op == "call_function":
        if node.target is getattr:
            return "meta"
        return FUNCTION_KINDS.get(node.target, "float")
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "float")
    return "float"


def module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The fx nodes among a node's inputs that carry tensors (skipping ``x.size()`` and friends)."""
    args = node.args[0] if node.target in (torch.cat, torch.concat) else node.args
    return [a for a in args if isinstance(a, fx.Node) and a.meta.get("is_tensor", True)]


def act_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``relu`` or ``relu6`` for an ``act`` node."""
    mod = module(gm, node)
    if isinstance(mod, nn.ReLU6) or node.target is F.relu6:
        return "relu6"
    return "relu"
