"""Graph passes: ``verb(gm) -> gm``. ``algorithms.ptq.prepare`` runs them (gated activations, BN folding, Conv+ReLU fusion, CLE)."""

from __future__ import annotations

import copy

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.modules import ConvAct
from . import ops

__all__ = ["fold_bn", "fuse_conv_act", "MULTIPLY", "GATES", "fuse_gated_activations"]


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm2d that directly follows a Conv2d (with no other user) into the conv.

    w' = w * gamma / sqrt(var + eps);  b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    The model keeps computing the same function (in eval mode); a test checks it.
    """
    for node in list(gm.graph.nodes):
        bn = ops.module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        conv = ops.module(gm, prev)
        if type(conv) is not nn.Conv2d or _single_user(prev) is not node or not bn.track_running_stats:
            continue
        fused = copy.deepcopy(conv)
        with torch.no_grad():
            inv_std = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused.weight.copy_(conv.weight * inv_std.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            fused.bias = nn.Parameter((bias - bn.running_mean) * inv_std + bn.bias)
        _set_module(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    return _finish(gm)


def fuse_conv_act(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace Conv2d -> ReLU/ReLU6 by one ``ConvAct`` so a single quantizer follows the activation.

    This is Lee et al.'s scale substitution: the activation's output scale replaces the conv's output
    scale, removing one quantize step (and the precision it loses).
    """
    for node in list(gm.graph.nodes):
        conv = ops.module(gm, node)
        user = _single_user(node)
        if type(conv) is not nn.Conv2d or user is None or ops.kind(gm, user) != "act":
            continue
        _set_module(gm, node.target, ConvAct(conv, ops.act_name(gm, user)))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
    return _finish(gm)


MULTIPLY = (operator.mul, torch.mul, "mul")
GATES = {"sigmoid": F.silu, "hardsigmoid": F.hardswish}  # x * gate(x) -> the one activation it spells


def fuse_gated_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """Recognize ``x * sigmoid(x)`` as SiLU and ``x * hardsigmoid(x)`` as hard-swish (how ONNX files before
    opset 22 and many exporters write them), so they quantize as one activation on codes instead of a
    sigmoid, a float multiplication and an extra quantizer."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in MULTIPLY or len(node.args) != 2:
            continue
        a, b = node.args
        for gate, x in ((a, b), (b, a)):
            if not isinstance(gate, fx.Node) or not isinstance(x, fx.Node) or ops.kind(gm, gate) != "lut":
                continue
            name, _ = ops.lut_name(gm, gate)
            gate_input = gate.args[0] if gate.args else None
            if name in GATES and gate_input is x:
                with gm.graph.inserting_after(node):
                    fused = gm.graph.call_function(GATES[name], (x,))
                fused.meta.update(node.meta)
                node.replace_all_uses_with(fused)
                gm.graph.erase_node(node)
                break
    return _finish(gm)


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, name, mod)


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
