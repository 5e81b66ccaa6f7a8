"""What each fx node *is*, in one flat table per role (style rule 7).

``kind(gm, node)`` names a node's role in quantization:
* ``conv`` / ``linear``: weighted compute, output gets its own quantizer;
* ``add`` / ``mul`` / ``cat`` / ``avgpool``: integer compute that requantizes (QLinearAdd / QLinearMul /
  QLinearConcat / pooling); an add or mul with a constant or scalar operand is ``float`` instead;
* ``act``: ReLU / ReLU6, fused into the producer's output quantizer or requantized when fusion is off;
* ``lut``: any other elementwise activation (SiLU, sigmoid, hard-swish, leaky ReLU, tanh, GELU, ...): integer
  codes in, integer codes out through a table with one entry per input code (what integer NPUs do), so its
  input and its output each get a quantizer;
* ``pass``: data movement that keeps its input's scale (max pool, slicing, zero padding, flatten, reshape,
  transpose, channel selection, split, nearest upsampling, dropout);
* ``softmax``: always computed in float (DequantizeLinear -> Softmax), re-quantized only where a quantized op
  reads it (a detection head's class scores);
* ``quant``: an ``ActQuant`` inserted by edgeslim;
* ``const``: a tensor that does not depend on the model input (anchor tables, folded constants): baked into
  whichever float island reads it;
* ``float``: anything else, which stays FP32 (reported as a float island).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant.modules import ActQuant, ConvAct, GatedSiLU, QuantConv2d, QuantLinear

__all__ = ["MODULE_KINDS", "FUNCTION_KINDS", "METHOD_KINDS", "kind", "is_depthwise", "module", "tensor_args",
           "is_split", "act_name", "LUT_FUNCTIONS", "lut_name", "call_node", "softmax_axis"]


MODULE_KINDS: dict[type, str] = {
    nn.Conv2d: "conv",
    ConvAct: "conv",
    QuantConv2d: "conv",
    nn.Linear: "linear",
    QuantLinear: "linear",
    nn.ReLU: "act",
    nn.ReLU6: "act",
    nn.SiLU: "lut",
    GatedSiLU: "lut",
    nn.Sigmoid: "lut",
    nn.Hardswish: "lut",
    nn.Hardsigmoid: "lut",
    nn.LeakyReLU: "lut",
    nn.Tanh: "lut",
    nn.GELU: "lut",
    nn.Mish: "lut",
    nn.ELU: "lut",
    nn.Upsample: "pass",
    nn.Softmax: "softmax",
    nn.AdaptiveAvgPool2d: "avgpool",
    nn.AvgPool2d: "avgpool",
    nn.MaxPool2d: "pass",
    nn.Flatten: "pass",
    nn.Identity: "pass",
    nn.Dropout: "pass",
    nn.PixelShuffle: "pass",
    nn.PixelUnshuffle: "pass",
    ActQuant: "quant",
}

FUNCTION_KINDS: dict[object, str] = {
    operator.add: "add",
    operator.iadd: "add",
    operator.mul: "mul",
    torch.mul: "mul",
    torch.add: "add",
    torch.cat: "cat",
    torch.concat: "cat",
    F.relu: "act",
    torch.relu: "act",
    F.relu6: "act",
    F.silu: "lut",
    torch.sigmoid: "lut",
    F.sigmoid: "lut",
    F.hardswish: "lut",
    F.hardsigmoid: "lut",
    F.leaky_relu: "lut",
    torch.tanh: "lut",
    F.tanh: "lut",
    F.gelu: "lut",
    F.mish: "lut",
    F.elu: "lut",
    F.interpolate: "pass",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.reshape: "pass",
    torch.permute: "pass",
    torch.transpose: "pass",
    torch.split: "pass",
    torch.chunk: "pass",
    torch.select: "pass",
    F.adaptive_avg_pool2d: "avgpool",
    torch.mean: "avgpool",
    F.avg_pool2d: "avgpool",
    F.max_pool2d: "pass",
    torch.flatten: "pass",
    operator.getitem: "pass",
    F.pad: "pass",
    F.dropout: "pass",
    F.pixel_shuffle: "pass",
    F.pixel_unshuffle: "pass",
    torch.pixel_shuffle: "pass",
    torch.pixel_unshuffle: "pass",
    torch.squeeze: "pass",
    torch.unsqueeze: "pass",
}

METHOD_KINDS: dict[str, str] = {
    "relu": "act",
    "relu_": "act",
    "add": "add",
    "add_": "add",
    "mul": "mul",
    "flatten": "pass",
    "view": "pass",
    "reshape": "pass",
    "permute": "pass",
    "transpose": "pass",
    "contiguous": "pass",
    "squeeze": "pass",
    "unsqueeze": "pass",
    "split": "pass",
    "chunk": "pass",
    "sigmoid": "lut",
    "softmax": "softmax",
    "tanh": "lut",
    "size": "meta",
    "mean": "avgpool",
}


def kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """The role of ``node`` (see the module docstring); ``placeholder`` / ``output`` / ``meta`` for the rest."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.meta.get("const"):
        return "const"
    k = _table_kind(gm, node)
    if k in ("add", "mul", "cat"):  # with a constant or a scalar operand: elementwise float arithmetic
        args = tensor_args(node)
        if len(args) < (1 if k == "cat" else 2) or any(a.meta.get("const") for a in args):
            return "float"
    if k == "pass" and not _codes_preserving(gm, node):
        return "float"
    if k == "avgpool" and node.target in ("mean", torch.mean) and not _spatial_mean(node):
        return "float"
    return k


def _table_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return MODULE_KINDS.get(type(gm.get_submodule(node.target)), "float")
    if node.meta.get("is_tensor") is False and not is_split(node):
        return "meta"  # Python values derived from shapes (x.shape[1] // 2): folded by tracing
    if node.op == "call_function":
        if node.target is getattr:
            return "meta"
        if node.target is operator.getitem and _indexes_non_tensor(node):
            return "meta"  # x.shape[1], x.size()[0]: Python values, folded by tracing
        return FUNCTION_KINDS.get(node.target, "float")
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "float")
    return "float"


def _codes_preserving(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Data movement whose output values are input values (so it runs on codes): resizing counts only when
    it is nearest-neighbour; bilinear / bicubic resizing computes new values and runs in float."""
    mod = module(gm, node)
    if isinstance(mod, nn.Upsample) or node.target is F.interpolate:
        mode = mod.mode if mod is not None else node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        return mode == "nearest"
    return True


def _spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` / ``torch.mean(x, [-1, -2])`` on an N, C, H, W tensor: a global average pool."""
    shape = tensor_args(node)[0].meta.get("shape") if tensor_args(node) else None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if shape is None or len(shape) != 4 or dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(int(d) % 4 for d in dims) == [2, 3]


def _indexes_non_tensor(node: fx.Node) -> bool:
    src = node.args[0]
    return isinstance(src, fx.Node) and not src.meta.get("is_tensor", True) and not is_split(src)


def is_depthwise(mod: nn.Module | None) -> bool:
    """A conv (or conv + activation) with one input channel per group: groups == input channels > 1."""
    conv = getattr(mod, "conv", mod)
    groups = getattr(conv, "groups", 1)
    return isinstance(groups, int) and groups > 1 and groups == getattr(conv, "in_channels", 0)


def module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The fx nodes among a node's inputs that carry tensors (skipping ``x.size()`` and friends)."""
    args = node.args[0] if node.target in (torch.cat, torch.concat) else node.args
    if node.target is operator.getitem and isinstance(args[0], fx.Node) and is_split(args[0]):
        return [args[0]]  # one piece of a split: its source is the split's (tuple-valued) output
    return [a for a in args if isinstance(a, fx.Node) and a.meta.get("is_tensor", True)]


def is_split(node: fx.Node) -> bool:
    """``torch.split`` / ``torch.chunk`` (or the methods): a tuple of pieces that ``getitem`` picks from."""
    return node.op in ("call_function", "call_method") and node.target in (torch.split, torch.chunk, "split", "chunk")


def act_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``relu`` or ``relu6`` for an ``act`` node."""
    mod = module(gm, node)
    if isinstance(mod, nn.ReLU6) or node.target is F.relu6:
        return "relu6"
    return "relu"


LUT_FUNCTIONS = {  # fx target -> the activation's name in the IntGraph (``LUT`` attrs, float-island op)
    nn.SiLU: "silu", F.silu: "silu", GatedSiLU: "silu",
    nn.Sigmoid: "sigmoid", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", "sigmoid": "sigmoid",
    nn.Hardswish: "hardswish", F.hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", F.hardsigmoid: "hardsigmoid",
    nn.LeakyReLU: "leaky_relu", F.leaky_relu: "leaky_relu",
    nn.Tanh: "tanh", torch.tanh: "tanh", F.tanh: "tanh", "tanh": "tanh",
    nn.GELU: "gelu", F.gelu: "gelu",
    nn.Mish: "mish", F.mish: "mish",
    nn.ELU: "elu", F.elu: "elu",
}


def lut_name(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict]:
    """(activation name, its parameters) of a ``lut`` node, e.g. ``("leaky_relu", {"alpha": 0.1})``."""
    mod = module(gm, node)
    name = LUT_FUNCTIONS[type(mod) if mod is not None else node.target]
    params: dict = {}
    if name == "leaky_relu":
        params["alpha"] = float(mod.negative_slope if mod is not None else
                                node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01))
    elif name == "elu":
        params["alpha"] = float(mod.alpha if mod is not None else node.kwargs.get("alpha", 1.0))
    elif isinstance(mod, GatedSiLU) and not mod.gate.spec.is_float and mod.gate.mode == "quant":
        g = mod.gate
        params.update(gate_scale=float(g.scale), gate_zero_point=int(g.zero_point), gate_bits=g.spec.bits,
                      gate_signed=bool(g.signed))
    elif name == "gelu":
        approx = mod.approximate if mod is not None else node.kwargs.get("approximate", "none")
        params["approximate"] = str(approx)
    return name, params


def call_node(gm: fx.GraphModule, node: fx.Node, *args: torch.Tensor) -> torch.Tensor:
    """Evaluate one fx node's operation on given tensor inputs (same non-tensor arguments)."""
    it = iter(args)
    fill = lambda a: next(it) if isinstance(a, fx.Node) else a  # noqa: E731
    call_args = tuple(fill(a) for a in node.args)
    kwargs = {k: (next(it) if isinstance(v, fx.Node) else v) for k, v in node.kwargs.items()}
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*call_args, **kwargs)
    if node.op == "call_method":
        return getattr(call_args[0], node.target)(*call_args[1:], **kwargs)
    return node.target(*call_args, **kwargs)


def softmax_axis(gm: fx.GraphModule, node: fx.Node) -> int:
    mod = module(gm, node)
    dim = mod.dim if mod is not None else node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        raise ValueError(f"softmax {node.name} without dim")
    return int(dim)
