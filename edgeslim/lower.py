"""Fake-quant GraphModule (after ``ptq.freeze``) -> ``IntGraph``.

Walks the fx graph once. Every ``ActQuant`` closes one node: a QuantizeLinear when its input is float,
or the requantizing op that produced its input (conv, linear, add, cat, pooling, ReLU with fusion off).
Pass-through ops become data movement that shares its input's ``QParams``. Dispatch is by tables: a node's
``graph.ops`` kind picks its integer or float lowering (``INTEGER_LOWERINGS`` / ``FLOAT_LOWERINGS``), data
movement is looked up as ``graph.ops`` looks up kinds (``PASS_MODULES`` / ``PASS_FUNCTIONS`` / ``PASS_METHODS``);
every node written is an op of ``intgraph.OP_CATEGORIES``.

Mixed precision: an op runs as an integer kernel only when its inputs, its weights and its output
quantizer are all integer. Otherwise it becomes a float node (ONNX op name: ``Conv``, ``Gemm``, ``Add``,
``Concat``, ``Relu``, ``Clip``, pooling) that reads integer inputs through DequantizeLinear, and its
output quantizer becomes a QuantizeLinear (integer), a ``Cast`` to FP16 (``float16``) or nothing (FP32).
Float tensors are the names absent from ``IntGraph.qparams``; ``IntGraph.float16`` lists the FP16 ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import EdgeslimError
from .graph import ops
from .graph.island import node_to_onnx
from .intgraph import LUT_ACTIVATIONS, IntGraph, IntNode, QParams
from .quant.fixed_point import multiplier_arrays
from .quant import primitives as P
from .quant.modules import ActQuant, QuantConv2d, QuantLinear

__all__ = ["lower", "qparams_of", "INTEGER_LOWERINGS", "FLOAT_LOWERINGS", "PASS_MODULES", "PASS_FUNCTIONS",
           "PASS_METHODS", "PASS_OPS"]


def qparams_of(q: ActQuant) -> QParams:
    return QParams(float(q.scale), int(q.zero_point), q.spec.bits, q.signed)


def lower(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> IntGraph:
    """Build the IntGraph of a frozen fake-quant model (see ``algorithms.ptq``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    g = IntGraph(input_name=placeholders[0].name, input_shape=tuple(input_shape), output_names=[])
    float_names = {placeholders[0].name}
    for node in gm.graph.nodes:
        k = ops.kind(gm, node)
        if k == "quant":
            _lower_quant(gm, g, node, float_names)
        elif k == "pass":
            _lower_pass(gm, g, node, float_names)
        elif k in ("softmax", "float"):
            _lower_float_op(gm, g, node, float_names)
        elif k == "output":
            for out in _flat(node.args[0]):
                if ops.kind(gm, out) == "linear" and out.name not in g.qparams:
                    if _is_integer_op(gm, g, out, None):
                        _lower_weighted(gm, g, out, out, None, "QGemm")  # float logits: dequantized accumulator
                    else:
                        _lower_float_op(gm, g, out, float_names)
                    g.output_names.append(out.name)
                    g.output_shapes.append(tuple(out.meta["shape"][1:]))
                    continue
                if out.name in float_names or out.name in g.float16:
                    name = f"{out.name}_float"
                    g.nodes.append(IntNode("Cast", name, [out.name], [name], {"to": "float32"}))
                    g.output_names.append(name)
                    g.output_shapes.append(tuple(out.meta["shape"][1:]))
                    continue
                if out.name not in g.qparams:
                    raise EdgeslimError(f"model output {out.name} is not quantized: INT8 export needs a quantized output")
                name = f"{out.name}_float"
                g.nodes.append(IntNode("DequantizeLinear", name, [out.name], [name]))
                g.output_names.append(name)
                g.output_shapes.append(tuple(out.meta["shape"][1:]))
        elif k in ("placeholder", "meta", "get_attr", "const") or _consumed_by_quant(gm, node):
            continue
        else:  # an op whose output no quantizer closes (e.g. an activation on a float tensor): float
            _lower_float_op(gm, g, node, float_names)
    return g


def _flat(arg) -> list[fx.Node]:
    if isinstance(arg, fx.Node):
        return [arg]
    return [a for sub in arg for a in _flat(sub)]


def _describe(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _consumed_by_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Compute nodes are emitted when their output quantizer is reached."""
    k = ops.kind(gm, node)
    if k == "linear" and all(u.op == "output" for u in node.users):
        return True  # float-output layer, emitted at the output node
    return len(node.users) >= 1 and all(ops.kind(gm, u) in ("quant", "act") for u in node.users) and \
        k in ("conv", "linear", "add", "mul", "cat", "avgpool", "act", "lut")


def _close_float(g: IntGraph, qmod: ActQuant, src_name: str, name: str, float_names: set[str]) -> None:
    """The output quantizer of a float tensor: QuantizeLinear (integer), Cast to FP16, or an alias (FP32)."""
    if qmod.spec.is_float:
        op = "Cast" if qmod.spec.fmt == "fp16" else "Identity"
        g.nodes.append(IntNode(op, name, [src_name], [name], {"to": "float16"} if op == "Cast" else {}))
        float_names.add(name)
        if op == "Cast":
            g.float16.add(name)
        return
    g.qparams[name] = qparams_of(qmod)
    g.nodes.append(IntNode("QuantizeLinear", name, [src_name], [name]))


def _is_integer_op(gm: fx.GraphModule, g: IntGraph, src: fx.Node, qmod: ActQuant | None) -> bool:
    if qmod is not None and qmod.spec.is_float:
        return False
    mod = ops.module(gm, src)
    if isinstance(mod, (QuantConv2d, QuantLinear)) and mod.spec.is_float:
        return False
    return all(a.name in g.qparams for a in ops.tensor_args(src))


def _lower_quant(gm: fx.GraphModule, g: IntGraph, node: fx.Node, float_names: set[str]) -> None:
    qmod = ops.module(gm, node)
    src = node.args[0]
    k = ops.kind(gm, src)
    fused_add = k == "act" and ops.kind(gm, src.args[0]) == "add" and src.args[0].name not in g.qparams \
        and src.args[0].name not in float_names
    if src.op == "placeholder" or src.name in float_names:
        _close_float(g, qmod, src.name, node.name, float_names)
        return
    if not _is_integer_op(gm, g, src.args[0] if fused_add else src, qmod):
        if fused_add:
            _lower_float_op(gm, g, src.args[0], float_names)
        _lower_float_op(gm, g, src, float_names)
        _close_float(g, qmod, src.name, node.name, float_names)
        return
    out_q = qparams_of(qmod)
    clamp = (out_q.qmin, out_q.qmax)
    if fused_add:
        clamp = _act_clamp(gm, src, out_q)  # fused Add + ReLU: one QLinearAdd with a clamp
        src, k = src.args[0], "add"
    g.qparams[node.name] = out_q
    ins = [a.name for a in ops.tensor_args(src)] if src.op != "placeholder" else [src.name]
    lowering = INTEGER_LOWERINGS.get(k)
    if lowering is None:
        raise EdgeslimError(
            f"operation {_describe(src)} ({src.name}) runs in float before a quantizer; the INT8 exporter does "
            "not support float islands yet: open an issue with the model"
        )
    lowering(gm, g, src, node, qmod, ins, clamp)


def _int_conv(gm, g, src, qnode, qmod, ins, clamp) -> None:
    _lower_weighted(gm, g, src, qnode, g.qparams[qnode.name], "QLinearConv")


def _int_linear(gm, g, src, qnode, qmod, ins, clamp) -> None:
    _lower_weighted(gm, g, src, qnode, g.qparams[qnode.name], "QGemm")


def _int_add(gm, g, src, qnode, qmod, ins, clamp) -> None:
    g.nodes.append(IntNode("QLinearAdd", qnode.name, ins, [qnode.name], {"clamp": clamp}))


def _int_mul(gm, g, src, qnode, qmod, ins, clamp) -> None:
    g.nodes.append(IntNode("QLinearMul", qnode.name, ins, [qnode.name], {"clamp": clamp}))


def _int_concat(gm, g, src, qnode, qmod, ins, clamp) -> None:
    dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
    g.nodes.append(IntNode("QLinearConcat", qnode.name, ins, [qnode.name], {"axis": dim, "clamp": clamp}))


def _int_relu(gm, g, src, qnode, qmod, ins, clamp) -> None:
    g.nodes.append(IntNode("QLinearRelu", qnode.name, ins[:1], [qnode.name],
                           {"clamp": _act_clamp(gm, src, g.qparams[qnode.name])}))


def _int_avgpool(gm, g, src, qnode, qmod, ins, clamp) -> None:
    g.nodes.append(_lower_avgpool(gm, src, qnode, ins[0], g))


def _int_lut(gm, g, src, qnode, qmod, ins, clamp) -> None:
    fn, params = ops.lut_name(gm, src)
    table = _lut_table(gm, src, g.qparams[ins[0]], qmod)
    g.nodes.append(IntNode("LUT", qnode.name, ins[:1], [qnode.name], {"fn": fn, **params, "clamp": clamp},
                           {"table": table}))


def _lower_float_op(gm: fx.GraphModule, g: IntGraph, src: fx.Node, float_names: set[str]) -> None:
    """Emit ``src`` as a float node producing float tensor ``src.name`` (inputs: integer, FP16 or FP32)."""
    ins = [a.name for a in ops.tensor_args(src)]
    lowering = FLOAT_LOWERINGS.get(ops.kind(gm, src))
    g.nodes.append(lowering(gm, src, ins) if lowering is not None else _island(gm, g, src, float_names))
    float_names.add(src.name)


def _float_weighted(gm, src: fx.Node, ins: list[str], op: str) -> IntNode:
    mod = ops.module(gm, src)
    arrays, attrs = _float_weights(mod)
    attrs["module"] = src.target
    if op == "Conv":
        attrs.update(_conv_attrs(src, mod), act=mod.act)
    return IntNode(op, src.name, ins[:1], [src.name], attrs, arrays)


def _float_conv(gm, src, ins) -> IntNode:
    return _float_weighted(gm, src, ins, "Conv")


def _float_linear(gm, src, ins) -> IntNode:
    return _float_weighted(gm, src, ins, "Gemm")


def _float_add(gm, src, ins) -> IntNode:
    return IntNode("Add", src.name, ins, [src.name])


def _float_mul(gm, src, ins) -> IntNode:
    return IntNode("Mul", src.name, ins, [src.name])


def _float_concat(gm, src, ins) -> IntNode:
    dim = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else 0)
    return IntNode("Concat", src.name, ins, [src.name], {"axis": dim})


def _float_relu(gm, src, ins) -> IntNode:
    name = ops.act_name(gm, src)
    return IntNode("Relu" if name == "relu" else "Clip", src.name, ins[:1], [src.name],
                   {} if name == "relu" else {"min": 0.0, "max": 6.0})


def _float_avgpool(gm, src, ins) -> IntNode:
    if _padded_avgpool(gm, src):  # float: ONNX AveragePool with its pads counted
        mod = ops.module(gm, src)
        ph, pw = _pair(mod.padding)
        return IntNode("AveragePool", src.name, ins[:1], [src.name],
                       {"kernel_shape": _pair(mod.kernel_size), "strides": _pair(mod.stride or mod.kernel_size),
                        "pads": [ph, pw, ph, pw], "count_include_pad": 1})
    node = _lower_avgpool(gm, src, src, ins[0])
    node.op = {"QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool"}[node.op]
    if node.op == "GlobalAveragePool":
        node.op, node.attrs = ("GlobalAveragePool", {}) if node.attrs["keepdims"] else \
            ("ReduceMean", {"axes": [2, 3], "keepdims": 0})
    return node


def _float_lut(gm, src, ins) -> IntNode:
    fn, params = ops.lut_name(gm, src)
    return IntNode(LUT_ACTIVATIONS[fn], src.name, ins[:1], [src.name], params)


def _float_softmax(gm, src, ins) -> IntNode:
    return IntNode("Softmax", src.name, ins[:1], [src.name], {"axis": ops.softmax_axis(gm, src)})


# ``graph.ops.kind`` -> the lowering of a node of that kind whose output an integer quantizer closes (it appends
# its IntGraph nodes), and -> the lowering of one that runs in float (it returns the float node; a kind missing
# here becomes a float island, ``graph.island``)
INTEGER_LOWERINGS: dict[str, Callable] = {
    "conv": _int_conv,
    "linear": _int_linear,
    "add": _int_add,
    "mul": _int_mul,
    "cat": _int_concat,
    "act": _int_relu,
    "avgpool": _int_avgpool,
    "lut": _int_lut,
}
FLOAT_LOWERINGS: dict[str, Callable] = {
    "conv": _float_conv,
    "linear": _float_linear,
    "add": _float_add,
    "mul": _float_mul,
    "cat": _float_concat,
    "act": _float_relu,
    "avgpool": _float_avgpool,
    "lut": _float_lut,
    "softmax": _float_softmax,
}


def _island(gm: fx.GraphModule, g: IntGraph, src: fx.Node, float_names: set[str], out: str | None = None) -> IntNode:
    """Any op as a float island (``graph.island``): its integer inputs are dequantized, it runs in FP32."""
    inputs = [a for a in ops.tensor_args(src) if not a.meta.get("const")]
    missing = [a.name for a in inputs if a.name not in g.qparams and a.name not in float_names]
    if missing:
        raise EdgeslimError(f"operation {_describe(src)} ({src.name}) reads {', '.join(missing)}, which the INT8 "
                            "exporter did not produce: open an issue with the model")
    dynamic = getattr(gm, "meta", {}).get("onnx_dynamic_batch", True) is not False
    model = node_to_onnx(gm, src, inputs, dynamic_batch=dynamic)
    out = out or src.name
    fn = type(ops.module(gm, src)).__name__ if src.op == "call_module" else _describe(src)
    return IntNode("FloatIsland", out, [a.name for a in inputs], [out], {"fn": fn, "node": src.name},
                   {"onnx": np.frombuffer(model, np.uint8)})


def _lut_table(gm: fx.GraphModule, src: fx.Node, in_q: QParams, qmod: ActQuant) -> np.ndarray:
    """Output code for every input code: ``quantize(f(dequantize(q)))``, computed with the model's own op.

    This is exactly what the fake-quant simulation computes on the same codes, so the table is bit-exact
    with it; an integer device stores these 2**bits entries instead of evaluating ``f``.
    """
    if qmod._modules.get("aq") is not None:
        raise EdgeslimError(f"activation {src.name}: non-uniform output levels cannot be written as a table yet")
    codes = torch.arange(in_q.qmin, in_q.qmax + 1, dtype=torch.int64)
    x = P.dequantize(codes, torch.tensor(in_q.scale), torch.tensor(in_q.zero_point))
    with torch.no_grad():
        y = ops.call_node(gm, src, x.reshape(1, -1, 1, 1)).reshape(-1)
    return P.quantize(y, qmod.scale, qmod.zero_point, qmod.qmin, qmod.qmax).numpy().astype(np.int64)


def _int_weight_arrays(mod) -> dict[str, np.ndarray]:
    """Integer weight codes with their per-channel (or single) scales and zero points."""
    return {"w": mod.weight_int().numpy().astype(np.int32),
            "w_scale": mod.w_scale.detach().float().numpy().reshape(-1),
            "w_zero_point": mod.w_zero_point.numpy().astype(np.int32).reshape(-1)}


def _conv_attrs(src: fx.Node, mod) -> dict:
    if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        raise EdgeslimError(f"conv {src.target}: padding {mod.padding!r}/{mod.padding_mode} is not exportable yet")
    return {"strides": list(mod.stride), "pads": [mod.padding[0], mod.padding[1]] * 2,
            "dilations": list(mod.dilation), "group": mod.groups}


def _float_weights(mod) -> tuple[dict, dict]:
    """A float node's weights: integer codes + scales (weight-only quantization) or FP16 / FP32 values."""
    if not mod.spec.is_float:
        arrays = _int_weight_arrays(mod)
        attrs = {"w_bits": mod.spec.bits, "per_channel": mod.w_axis == 0}
    else:
        dtype = np.float16 if mod.spec.fmt == "fp16" else np.float32
        arrays = {"w_float": mod.weight.detach().numpy().astype(dtype)}
        attrs = {"w_format": mod.spec.fmt}
    bias = mod.bias_int()
    if bias is not None:  # integer input and weights: the int32 bias the simulation uses
        arrays["bias"] = bias.numpy().astype(np.int64)
    elif mod.quant_bias() is not None:
        dtype = np.float16 if mod.spec.fmt == "fp16" else np.float32
        arrays["b_float"] = mod.quant_bias().detach().numpy().astype(dtype)
    return arrays, attrs


def _act_clamp(gm: fx.GraphModule, act: fx.Node, q: QParams) -> tuple[int, int]:
    return _clamp_for(ops.act_name(gm, act), q)


def _lower_weighted(gm, g: IntGraph, src: fx.Node, qnode: fx.Node, out_q: QParams, op: str) -> None:
    mod = ops.module(gm, src)
    in_name = ops.tensor_args(src)[0].name
    in_q = g.qparams[in_name]
    w_scale = mod.w_scale.detach().double().numpy().reshape(-1)
    arrays = _int_weight_arrays(mod)
    if out_q is not None:  # requantize to the output codes; None = float output (dequantized accumulator)
        arrays.update(multiplier_arrays(in_q.scale * w_scale / out_q.scale))
    bias = mod.bias_int()
    if bias is not None:
        arrays["bias"] = bias.numpy().astype(np.int64)
    attrs = {"w_bits": mod.spec.bits, "per_channel": mod.w_axis == 0, "module": src.target}
    if op == "QLinearConv":
        attrs.update(_conv_attrs(src, mod), clamp=(out_q.qmin, out_q.qmax))
        if mod.act:
            attrs["clamp"] = _clamp_for(mod.act, out_q)
    elif out_q is not None:
        attrs["clamp"] = (out_q.qmin, out_q.qmax)
    else:
        attrs["float_output"] = True
    g.nodes.append(IntNode(op, qnode.name, [in_name], [qnode.name], attrs, arrays))


def _clamp_for(act: str, q: QParams) -> tuple[int, int]:
    """Integer clamp of the output codes that implements a fused ReLU / ReLU6 (real 0 is the zero point)."""
    hi = q.qmax if act == "relu" else min(q.qmax, q.zero_point + int(round(6.0 / q.scale)))
    return max(q.qmin, q.zero_point), hi


def _padded_avgpool(gm, src: fx.Node) -> bool:
    mod = ops.module(gm, src)
    return isinstance(mod, nn.AvgPool2d) and any(_pair(mod.padding)) and mod.count_include_pad and not mod.ceil_mode


def _lower_avgpool(gm, src: fx.Node, qnode: fx.Node, in_name: str, g: IntGraph | None = None) -> IntNode:
    in_shape = ops.tensor_args(src)[0].meta["shape"]
    out_shape = src.meta["shape"]
    if len(out_shape) == 4 and out_shape[2:] == (1, 1) or (src.target in ("mean", torch.mean) and len(out_shape) == 2):
        return IntNode("QLinearGlobalAveragePool", qnode.name, [in_name], [qnode.name],
                       {"keepdims": len(out_shape) == 4})
    mod = ops.module(gm, src)
    if isinstance(mod, nn.AvgPool2d) or src.target is F.avg_pool2d:
        k = mod.kernel_size if mod is not None else src.args[1]
        s = (mod.stride if mod is not None else (src.args[2] if len(src.args) > 2 else None)) or k
        k, s = _pair(k), _pair(s)
        pad = mod.padding if mod is not None else (src.kwargs.get("padding", src.args[3] if len(src.args) > 3 else 0))
        ceil = mod.ceil_mode if mod is not None else src.kwargs.get("ceil_mode", False)
        include_pad = mod.count_include_pad if mod is not None else src.kwargs.get("count_include_pad", True)
        if any(_pair(pad)) and include_pad and not ceil and g is not None:
            # padding that counts in the average = zero padding (with the zero point) + an unpadded pool
            ph, pw = _pair(pad)
            padded = f"{qnode.name}_pad"
            g.qparams[padded] = g.qparams[in_name]
            g.nodes.append(IntNode("Pad", padded, [in_name], [padded], {"pads": [0, 0, ph, pw, 0, 0, ph, pw]}))
            in_name, pad = padded, 0
            in_shape = (*in_shape[:2], in_shape[2] + 2 * ph, in_shape[3] + 2 * pw)
        if not any(_pair(pad)) and not ceil and all((i - kk) // ss + 1 == o for i, kk, ss, o in zip(in_shape[2:], k, s, out_shape[2:])):
            return IntNode("QLinearAveragePool", qnode.name, [in_name], [qnode.name],
                           {"kernel_shape": k, "strides": s})
    raise EdgeslimError(f"average pooling {src.name} with output {out_shape} is not exportable yet")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _lower_pass(gm: fx.GraphModule, g: IntGraph, node: fx.Node, float_names: set[str]) -> None:
    """Data movement on codes; one that has no integer form here runs as a float island between
    DequantizeLinear and a QuantizeLinear with the input's own parameters (exact: it only moves values)."""
    try:
        _lower_pass_on_codes(gm, g, node, float_names)
    except EdgeslimError:
        src = ops.tensor_args(node)[0].name if ops.tensor_args(node) else None
        if src is None or (src not in g.qparams and src not in float_names):
            raise
        g.qparams.pop(node.name, None)
        float_names.discard(node.name)
        if src in float_names:
            g.nodes.append(_island(gm, g, node, float_names))
            float_names.add(node.name)
            return
        island = _island(gm, g, node, float_names, out=f"{node.name}_float")
        g.nodes.append(island)
        g.qparams[node.name] = g.qparams[src]
        g.nodes.append(IntNode("QuantizeLinear", node.name, island.outputs, [node.name]))


def _lower_pass_on_codes(gm: fx.GraphModule, g: IntGraph, node: fx.Node, float_names: set[str]) -> None:
    args = ops.tensor_args(node)
    if not args or (args[0].name not in g.qparams and args[0].name not in float_names):
        raise EdgeslimError(f"operation {_describe(node)} ({node.name}) on a float tensor is not exportable yet")
    src = args[0].name
    if src in g.qparams:
        g.qparams[node.name] = g.qparams[src]
    else:  # data movement on a float tensor (mixed precision): same op, float values
        float_names.add(node.name)  # FP16 values stay exact through data movement, which runs in FP32
    mod = ops.module(gm, node)
    lowering = _pass_lowering(node, mod)
    if lowering is None:
        raise EdgeslimError(f"operation {_describe(node)} ({node.name}) is not exportable yet")
    int_node = lowering(gm, node, mod, src, args[0].meta["shape"], node.meta["shape"])
    if int_node is not None:
        g.nodes.append(int_node)


def _pass_lowering(node: fx.Node, mod: nn.Module | None):
    """The lowering of a data-movement node, looked up as ``graph.ops.kind`` looks up its kind."""
    if mod is not None:
        return PASS_MODULES.get(type(mod))
    if node.op == "call_function":
        return PASS_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return PASS_METHODS.get(node.target)
    return None


def _pass_identity(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    return IntNode("Identity", node.name, [src], [node.name])


def _pass_max_pool(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    p = mod if mod is not None else None
    k = _pair(p.kernel_size if p else node.args[1])
    s = _pair((p.stride if p else node.kwargs.get("stride", node.args[2] if len(node.args) > 2 else None)) or k)
    pad = _pair(p.padding if p else node.kwargs.get("padding", 0))
    if (p.dilation if p else 1) not in (1, (1, 1)) or (p and p.ceil_mode):
        raise EdgeslimError(f"max pool {node.name}: dilation / ceil_mode is not exportable yet")
    return IntNode("MaxPool", node.name, [src], [node.name], {"kernel_shape": k, "strides": s, "pads": pad * 2})


def _pass_split(gm, node, mod, src, in_shape, out_shape) -> None:
    return None  # emits nothing: each getitem of it becomes a Slice of the split's input


def _pass_getitem(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    piece = ops.tensor_args(node)[0]
    if ops.is_split(piece):
        return IntNode("Slice", node.name, [ops.tensor_args(piece)[0].name], [node.name],
                       _split_piece(piece, node.args[1]))
    if any(isinstance(i, int) for i in _as_tuple(node.args[1])):
        return IntNode("Gather", node.name, [src], [node.name], _gather_attrs(node.args[1], node))
    return IntNode("Slice", node.name, [src], [node.name], _slice_attrs(node.args[1], in_shape))


def _pass_select(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    return IntNode("Gather", node.name, [src], [node.name], {"axis": node.args[1], "index": node.args[2]})


def _pass_resize(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    return IntNode("Resize", node.name, [src], [node.name], _nearest_attrs(node, mod, in_shape, out_shape))


def _pass_transpose(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    return IntNode("Transpose", node.name, [src], [node.name], {"perm": _perm(node, len(in_shape))})


def _pass_reshape(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    if len(out_shape) == 2 and out_shape[0] == in_shape[0] and out_shape[1] == int(np.prod(in_shape[1:])):
        return IntNode("Flatten", node.name, [src], [node.name], {"axis": 1})
    return IntNode("Reshape", node.name, [src], [node.name], {"shape": _reshape_to(gm, node, in_shape, out_shape)})


def _pass_pad(gm, node, mod, src, in_shape, out_shape) -> IntNode:
    pad = list(node.args[1])
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
    if mode != "constant" or value not in (0, 0.0, None):
        raise EdgeslimError(f"pad {node.name}: only zero padding is exportable")
    nd = len(in_shape)
    begins, ends = [0] * nd, [0] * nd
    for i in range(len(pad) // 2):
        begins[nd - 1 - i], ends[nd - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return IntNode("Pad", node.name, [src], [node.name], {"pads": begins + ends})


# Data movement (``graph.ops`` kind ``pass``) on codes, keyed as ``graph.ops`` keys kinds: module type, function,
# method name -> the lowering that writes its IntGraph node. A ``pass`` node missing here runs as a float island.
PASS_MODULES: dict[type, Callable] = {
    nn.Identity: _pass_identity,
    nn.Dropout: _pass_identity,
    nn.MaxPool2d: _pass_max_pool,
    nn.Upsample: _pass_resize,
    nn.Flatten: _pass_reshape,
}
PASS_FUNCTIONS: dict[object, Callable] = {
    F.dropout: _pass_identity,
    F.max_pool2d: _pass_max_pool,
    torch.split: _pass_split,
    torch.chunk: _pass_split,
    operator.getitem: _pass_getitem,
    torch.select: _pass_select,
    F.interpolate: _pass_resize,
    torch.permute: _pass_transpose,
    torch.transpose: _pass_transpose,
    torch.reshape: _pass_reshape,
    torch.squeeze: _pass_reshape,
    torch.unsqueeze: _pass_reshape,
    torch.flatten: _pass_reshape,
    F.pad: _pass_pad,
}
PASS_METHODS: dict[str, Callable] = {
    "contiguous": _pass_identity,
    "split": _pass_split,
    "chunk": _pass_split,
    "permute": _pass_transpose,
    "transpose": _pass_transpose,
    "view": _pass_reshape,
    "reshape": _pass_reshape,
    "squeeze": _pass_reshape,
    "unsqueeze": _pass_reshape,
    "flatten": _pass_reshape,
}
# the IntGraph ops each lowering above can write (all ``data_movement`` in ``intgraph.OP_CATEGORIES``)
PASS_OPS: dict[Callable, tuple[str, ...]] = {
    _pass_identity: ("Identity",),
    _pass_max_pool: ("MaxPool",),
    _pass_split: (),
    _pass_getitem: ("Slice", "Gather"),
    _pass_select: ("Gather",),
    _pass_resize: ("Resize",),
    _pass_transpose: ("Transpose",),
    _pass_reshape: ("Flatten", "Reshape"),
    _pass_pad: ("Pad",),
}


def _reshape_to(gm: fx.GraphModule, node: fx.Node, in_shape, out_shape) -> list[int]:
    """The ONNX Reshape target: the batch axis stays dynamic (0 copies it) when the reshape keeps it; a graph
    traced at batch 1 that folds the batch into another axis keeps its literal shape (batch 1 only)."""
    dynamic = getattr(gm, "meta", {}).get("onnx_dynamic_batch", True) is not False
    if dynamic and out_shape[0] == in_shape[0]:
        return [0, *out_shape[1:]]
    if dynamic:
        raise EdgeslimError(f"reshape {node.name} moves the batch axis ({in_shape} -> {out_shape})")
    return list(out_shape)


def _as_tuple(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _gather_attrs(index, node: fx.Node) -> dict:
    """``x[:, i]``: one integer index on one axis, the other axes untouched (ONNX Gather, scalar index)."""
    index = _as_tuple(index)
    ints = [(axis, i) for axis, i in enumerate(index) if isinstance(i, int)]
    if len(ints) != 1 or any(not isinstance(i, int) and i != slice(None) for i in index):
        raise EdgeslimError(f"indexing {node.name} with {index}: only one integer index (x[:, i]) is exportable")
    return {"axis": ints[0][0], "index": ints[0][1]}


def _split_piece(split: fx.Node, i: int) -> dict:
    """The Slice that takes piece ``i`` of ``torch.split(x, size_or_sizes, dim)`` / ``torch.chunk(x, n, dim)``."""
    shape = ops.tensor_args(split)[0].meta["shape"]
    args = list(split.args[1:])
    dim = split.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    dim = dim % len(shape)
    n = shape[dim]
    arg = split.kwargs.get("split_size_or_sections", split.kwargs.get("chunks", args[0] if args else None))
    if split.target in (torch.chunk, "chunk"):
        step = -(-n // int(arg))
        sizes = [min(step, n - j) for j in range(0, n, step)]
    elif isinstance(arg, int):
        sizes = [min(arg, n - j) for j in range(0, n, arg)]
    else:
        sizes = [int(v) for v in arg]
    start = sum(sizes[:i])
    return {"starts": [start], "ends": [start + sizes[i]], "axes": [dim], "steps": [1]}


def _nearest_attrs(node: fx.Node, mod, in_shape, out_shape) -> dict:
    """Nearest upsampling by an integer factor: ONNX Resize (asymmetric, floor), which equals torch's nearest."""
    mode = mod.mode if mod is not None else node.kwargs.get("mode", "nearest")
    factors = [o / i for i, o in zip(in_shape[2:], out_shape[2:])]
    if mode != "nearest" or any(f != int(f) or f < 1 for f in factors):
        raise EdgeslimError(f"upsampling {node.name} ({mode}, x{factors}): only nearest by integer factors is "
                            "exportable on integer codes")
    return {"scales": [1.0, 1.0, *factors], "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}


def _perm(node: fx.Node, ndim: int) -> list[int]:
    args = [a for a in node.args[1:]]
    if node.target in ("transpose", torch.transpose):
        a, b = (int(v) % ndim for v in args[:2])
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    return [int(d) % ndim for d in dims]


def _slice_attrs(index, in_shape) -> dict:
    index = index if isinstance(index, tuple) else (index,)
    starts, ends, axes, steps = [], [], [], []
    for axis, sl in enumerate(index):
        if sl is Ellipsis or not isinstance(sl, slice):
            raise EdgeslimError("only basic slicing (x[:, :, a:b:s]) is exportable")
        if sl == slice(None):
            continue
        step = sl.step or 1
        starts.append(sl.start or 0)
        ends.append(sl.stop if sl.stop is not None else in_shape[axis])
        axes.append(axis)
        steps.append(step)
    return {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
