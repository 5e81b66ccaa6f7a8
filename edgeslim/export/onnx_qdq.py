"""IntGraph -> ONNX in QDQ form that onnxruntime turns into integer kernels.

What onnxruntime (1.18+, CPU) fuses, and therefore what we write (see ``bench/probe_ort_fusion.py``):
* ``DQ(x) , DQ(w int8, per-channel, zp 0) , DQ(bias int32) -> Conv -> Q`` becomes ``QLinearConv``;
  onnxruntime only takes this path for **uint8 activations**, so every activation code is stored as
  uint8: a signed int8 code q with zero point z is written as q + 128 with zero point z + 128, which
  is the same real value (exact, not an approximation);
* ``DQ, DQ -> Add -> Q`` becomes ``QLinearAdd`` (``Mul``: ``QLinearMul``); ``DQ -> Gemm -> Q`` becomes ``QGemm``;
* data movement (MaxPool, Slice, Pad, Flatten, Reshape, Transpose, Gather, nearest Resize) is written
  directly on the uint8 codes; zero padding pads with the zero point;
* an elementwise activation on codes (``LUT``: SiLU, sigmoid, leaky ReLU, ...): ``activations="float"``
  (default) writes DequantizeLinear -> the float function -> QuantizeLinear, which onnxruntime runs fast
  (sigmoid / leaky ReLU fuse into its own lookup-table kernels) and which matches the table to one LSB at
  float32 rounding ties; ``activations="table"`` writes ``Cast`` to int32 + ``Gather`` from the 256-entry uint8
  table, integer in and out and bit-exact with the engine, but onnxruntime's Gather is slow (measured on
  yolov5n: 61 ms of 91 ms per image);
* max pooling of 8-bit codes goes through float (DQ -> MaxPool -> Q, exact: max commutes with the monotone
  dequantization): onnxruntime's uint8 MaxPool kernel is ~50x slower than its float one;
* activation ranges narrower than the uint8 container (bits < 8, or a fused ReLU whose zero point is
  not the range minimum) are enforced with an integer ``Clip`` between ``Q`` and the next ``DQ``.
Activations wider than 8 bits use uint16 / int16 Q/DQ (opset 21); onnxruntime runs those in float.
One writer per IntGraph op (``EMITTERS``, keyed by the op names of ``intgraph.OP_CATEGORIES``); ``NOT_EXPORTABLE``
names the ops without one and why.

Weight container (``weight_type``): 8-bit weights are stored as int8 (``u8s8``: the fast path on ARM and on x86
with VNNI) or as uint8 codes q + 128 with zero point z + 128 (``u8u8``, the same real values). On x86 CPUs with
AVX2 but no VNNI, onnxruntime's u8s8 kernels use ``vpmaddubsw``, which saturates the sum of two adjacent
u8 x s8 products at int16 and silently changes results (measured here: tiny models off by hundreds of LSB;
onnxruntime's quantization docs describe the same saturation). ``auto`` picks uint8 on such CPUs and int8
elsewhere, so the model onnxruntime runs on this machine computes what the simulation computes. Weights that fit
in [-64, 64] (``--w-bits 7`` or fewer) cannot saturate and keep int8 under ``auto``: on such CPUs they are the
way to get the fast kernel exactly (BENCHMARKS.md measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..cpu import int8_weights_saturate
from ..io.atomic import atomic_write_bytes
from ..intgraph import ACTIVATION_OPS, DATA_MOVEMENT, LUT_ACTIVATIONS, IntGraph, IntNode, QParams

__all__ = ["to_onnx", "save_onnx", "set_io_names", "set_metadata", "depth_multiplier", "EMITTERS", "NOT_EXPORTABLE",
           "ACTIVATION_EXPORTS", "WEIGHT_TYPES", "OPSET_8BIT", "OPSET_WIDE", "SATURATION_SAFE", "host_weight_type",
           "weight_container", "weight_containers", "is_depthwise", "resolve_weight_type", "exact_on_host"]

OPSET_8BIT, OPSET_WIDE = 17, 21
WEIGHT_TYPES = ("auto", "int8", "uint8")


def host_weight_type() -> str:
    """``uint8`` on x86 CPUs with AVX2 and no VNNI (where onnxruntime's u8s8 GEMM saturates), else ``int8``."""
    return "uint8" if int8_weights_saturate() else "int8"


SATURATION_SAFE = 64  # |w| <= 64: two u8 x s8 products sum to at most 2 * 255 * 64 = 32640 < 2**15


def weight_container(w: np.ndarray, zp: np.ndarray, weight_type: str = "auto", *,
                     depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """8-bit weight codes and zero points as stored for ``weight_type`` (uint8: q + 128, the same real values).

    ``auto`` keeps int8 where it is exact on this CPU: always on VNNI / ARM; on AVX2-only CPUs for weights within
    [-64, 64] (7-bit weights: onnxruntime's "reduce range" advice), whose pair sums cannot saturate, and for
    depthwise convs (one input channel per group), which onnxruntime runs with its own depthwise kernel, exact
    with any int8 weight (measured: tests/export/test_export_onnx.py).
    """
    unsafe = np.abs(np.asarray(w, np.int64)).max(initial=0) > SATURATION_SAFE and not depthwise
    if resolve_weight_type(weight_type) == "uint8" and (weight_type == "uint8" or unsafe):
        return (np.asarray(w, np.int32) + 128).astype(np.uint8), (np.asarray(zp, np.int32) + 128).astype(np.uint8)
    return np.asarray(w).astype(np.int8), np.asarray(zp).astype(np.int8)


def is_depthwise(node: IntNode) -> bool:
    """A conv with one input channel per group (after the export's channel repeat, any depth multiplier)."""
    return node.op == "QLinearConv" and node.attrs.get("group", 1) > 1 and node.arrays["w"].shape[1] == 1


def weight_containers(g: IntGraph, weight_type: str = "auto") -> dict[str, int]:
    """How many layers store their weights as int8 / uint8 / int16 (``summary.json``: ``weight_containers``)."""
    counts: dict[str, int] = {}
    for node in g.nodes:
        if "w" not in node.arrays:
            continue
        kind = "int16" if node.attrs["w_bits"] > 8 else str(weight_container(
            node.arrays["w"], node.arrays["w_zero_point"], weight_type, depthwise=is_depthwise(node))[0].dtype)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def resolve_weight_type(weight_type: str) -> str:
    if weight_type not in WEIGHT_TYPES:
        from ..errors import EdgeslimError
        raise EdgeslimError(f"invalid weight type {weight_type!r}: use one of {', '.join(WEIGHT_TYPES)}")
    return host_weight_type() if weight_type == "auto" else weight_type


def exact_on_host(model: onnx.ModelProto, weight_type: str = "auto") -> tuple[onnx.ModelProto, int]:
    """A copy of any QDQ model whose int8 conv / matmul weights are stored as ``weight_container`` stores them
    (uint8 codes q + 128, zero point z + 128 where this CPU's u8s8 kernels would saturate): the same real values,
    computed exactly by onnxruntime here. Returns (model, number of weights rewritten). Used to check other
    quantizers' files (onnxruntime's ``quantize_static`` writes int8 weights) against the integer engine."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    weight_inputs = {n.input[1]: n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                     and len(n.input) > 1}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in weight_inputs or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype != np.int8:
            continue
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits \
            else np.zeros((), np.int8)
        user = weight_inputs[node.output[0]]
        group = next((a.i for a in user.attribute if a.name == "group"), 1)
        qw, qz = weight_container(w, zp, weight_type,
                                  depthwise=user.op_type == "Conv" and group > 1 and w.ndim == 4 and w.shape[1] == 1)
        if qw.dtype == np.int8:
            continue
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(qw, node.input[0]))
        zname = node.input[0] + "_zero_point_u8"
        graph.initializer.append(numpy_helper.from_array(qz, zname))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = zname
        rewritten += 1
    return model, rewritten


def _container(q: QParams) -> tuple[int, int, np.dtype]:
    """(offset added to codes, ONNX elem type, numpy dtype) for an activation's stored codes."""
    if q.bits <= 8:
        return (128 if q.signed else 0), TensorProto.UINT8, np.uint8
    return 0, (TensorProto.INT16 if q.signed else TensorProto.UINT16), (np.int16 if q.signed else np.uint16)


class _Writer:
    def __init__(self, g: IntGraph, weight_type: str = "auto", activations: str = "float") -> None:
        self.g = g
        self.weight_type = weight_type
        self.activations = activations
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__{self.counter}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qparams_inputs(self, base: str, q: QParams) -> list[str]:
        offset, _, dtype = _container(q)
        return [self.const(f"{base}_scale", np.array(q.scale, dtype=np.float32)),
                self.const(f"{base}_zp", np.array(q.zero_point + offset, dtype=dtype))]

    def dq(self, name: str, codes: str | None = None) -> str:
        """A fresh DequantizeLinear of integer tensor ``name`` (one per consumer, as onnxruntime's fusion expects);
        ``codes``: dequantize this tensor instead, which holds codes of ``name``'s quantization (a gather of it)."""
        out = self.fresh(f"{name}_dq")
        self.nodes.append(helper.make_node("DequantizeLinear", [codes or name,
                                                                *self.qparams_inputs(name, self.g.qparams[name])],
                                           [out]))
        return out

    def repeat_channels(self, name: str, channels: int, multiplier: int) -> str:
        """Codes of ``name`` (``channels`` channels) with each channel repeated ``multiplier`` times (channel
        ``i*m + t`` is input ``i``): a Gather on the integer codes, exact."""
        index = self.const(f"{name}_repeat{multiplier}", np.repeat(np.arange(channels, dtype=np.int64), multiplier))
        out = self.fresh(f"{name}_repeat")
        self.nodes.append(helper.make_node("Gather", [name, index], [out], axis=1))
        return out

    def as_float(self, name: str) -> str:
        """An FP32 view of tensor ``name``: DequantizeLinear for codes, Cast for FP16, itself for FP32."""
        if name in self.g.qparams:
            return self.dq(name)
        if name in self.g.float16:
            out = self.fresh(f"{name}_f32")
            self.nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT))
            return out
        return name

    def float_const(self, base: str, value: np.ndarray) -> str:
        """A float initializer, stored as given (FP16 or FP32) and cast to FP32 for the computation."""
        name = self.const(base, value)
        if value.dtype == np.float16:
            out = self.fresh(f"{base}_f32")
            self.nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT))
            return out
        return name

    def q(self, float_name: str, out: str, clamp: tuple[int, int] | None = None) -> None:
        """QuantizeLinear into ``out``, plus an integer Clip when the range is narrower than the container."""
        q = self.g.qparams[out]
        offset, _, dtype = _container(q)
        info = np.iinfo(dtype)
        lo, hi = clamp if clamp is not None else (q.qmin, q.qmax)
        lo, hi = lo + offset, hi + offset
        needs_clip = lo > info.min or hi < info.max
        if needs_clip and q.bits > 8:  # onnxruntime has no 16-bit integer Clip: clamp the real value instead
            f_lo = np.array((lo - offset - q.zero_point) * q.scale, dtype=np.float32)
            f_hi = np.array((hi - offset - q.zero_point) * q.scale, dtype=np.float32)
            clipped = self.fresh(f"{out}_clip")
            self.nodes.append(helper.make_node("Clip", [float_name, self.const(f"{out}_flo", f_lo),
                                                        self.const(f"{out}_fhi", f_hi)], [clipped]))
            float_name, needs_clip = clipped, False
        raw = self.fresh(f"{out}_raw") if needs_clip else out
        self.nodes.append(helper.make_node("QuantizeLinear", [float_name, *self.qparams_inputs(out, q)], [raw]))
        if needs_clip:
            self.nodes.append(helper.make_node(
                "Clip", [raw, self.const(f"{out}_lo", np.array(lo, dtype=dtype)),
                         self.const(f"{out}_hi", np.array(hi, dtype=dtype))], [out]))

    def weight_dq(self, node: IntNode, key: str = "w") -> str:
        a = node.arrays
        if node.attrs["w_bits"] > 8:
            w, zp = a["w"].astype(np.int16), a["w_zero_point"].astype(np.int16)
        else:
            w, zp = weight_container(a["w"], a["w_zero_point"], self.weight_type, depthwise=is_depthwise(node))
        per_channel = len(a["w_scale"]) > 1
        scale = a["w_scale"] if per_channel else a["w_scale"].reshape(())
        zp = zp if per_channel else zp.reshape(())
        ins = [self.const(f"{node.name}_w", w), self.const(f"{node.name}_w_scale", scale),
               self.const(f"{node.name}_w_zp", zp)]
        out = self.fresh(f"{node.name}_w_dq")
        attrs = {"axis": 0} if per_channel else {}
        self.nodes.append(helper.make_node("DequantizeLinear", ins, [out], **attrs))
        return out

    def bias_dq(self, node: IntNode, in_name: str) -> str | None:
        if "bias" not in node.arrays:
            return None
        a = node.arrays
        scale = (np.float32(self.g.qparams[in_name].scale) * a["w_scale"].astype(np.float32)).astype(np.float32)
        per_channel = len(scale) > 1
        bias = np.broadcast_to(a["bias"], (len(a["bias"]),)).astype(np.int32)
        if not per_channel:
            scale = scale.reshape(())
        ins = [self.const(f"{node.name}_b", bias), self.const(f"{node.name}_b_scale", scale),
               self.const(f"{node.name}_b_zp", np.zeros(scale.shape, dtype=np.int32))]
        out = self.fresh(f"{node.name}_b_dq")
        self.nodes.append(helper.make_node("DequantizeLinear", ins, [out], **({"axis": 0} if per_channel else {})))
        return out

    def float_op(self, op: str, ins: list[str], node: IntNode, **attrs) -> None:
        if node.attrs.get("float_output"):  # the model output itself: no Q (onnxruntime: QGemm, float out)
            self.nodes.append(helper.make_node(op, ins, node.outputs, **attrs))
            return
        y = self.fresh(f"{node.name}_{op.lower()}")
        self.nodes.append(helper.make_node(op, ins, [y], **attrs))
        self.q(y, node.outputs[0], node.attrs.get("clamp"))


def _float_inputs(w: _Writer, node: IntNode) -> list[str]:
    """A float node of a mixed-precision graph reads FP32: integer / FP16 inputs are brought to FP32 first."""
    return [w.as_float(i) for i in node.inputs]


def _emit_float_weighted(w: _Writer, node: IntNode) -> None:
    """Float Conv / Gemm: FP16 / FP32 weights, or integer weights dequantized (weight-only quantization)."""
    op, a, out = node.op, node.attrs, node.outputs[0]
    ins = _float_inputs(w, node)
    arr = node.arrays
    weight = w.float_const(f"{node.name}_w", arr["w_float"]) if "w_float" in arr else w.weight_dq(node)
    bias = w.bias_dq(node, node.inputs[0]) if "bias" in arr else (
        w.float_const(f"{node.name}_b", arr["b_float"]) if "b_float" in arr else None)
    args = [ins[0], weight] + ([bias] if bias else [])
    act = a.get("act")
    y = w.fresh(f"{node.name}_pre") if act else out
    if op == "Conv":
        w.nodes.append(helper.make_node("Conv", args, [y], strides=a["strides"], pads=a["pads"],
                                        dilations=a["dilations"], group=a["group"],
                                        kernel_shape=list((arr.get("w_float", arr.get("w"))).shape[2:])))
    else:
        w.nodes.append(helper.make_node("Gemm", args, [y], transB=1))
    if act == "relu":
        w.nodes.append(helper.make_node("Relu", [y], [out]))
    elif act == "relu6":
        w.nodes.append(helper.make_node("Clip", [y, w.const("six_lo", np.array(0.0, np.float32)),
                                                 w.const("six_hi", np.array(6.0, np.float32))], [out]))


def _emit_float_clip(w: _Writer, node: IntNode) -> None:
    a, out = node.attrs, node.outputs[0]
    ins = _float_inputs(w, node)
    w.nodes.append(helper.make_node("Clip", [ins[0], w.const(f"{out}_lo", np.array(a["min"], np.float32)),
                                             w.const(f"{out}_hi", np.array(a["max"], np.float32))], [out]))


def _emit_float_activation(w: _Writer, node: IntNode) -> None:
    ins = _float_inputs(w, node)
    _emit_activation(w, node.op, ins[0], node.outputs[0], node.attrs)


def _emit_float_island(w: _Writer, node: IntNode) -> None:
    _emit_island(w, node, _float_inputs(w, node))


def _emit_cast(w: _Writer, node: IntNode) -> None:
    """To FP16, or back to FP32 for a model output (``as_float`` already widened it)."""
    ins = _float_inputs(w, node)
    out = node.outputs[0]
    w.nodes.append(helper.make_node("Cast", ins, [out], to=TensorProto.FLOAT16) if node.attrs["to"] == "float16"
                   else helper.make_node("Identity", ins, [out]))


def _emit_float_as_stored(w: _Writer, node: IntNode) -> None:
    """Add, Mul, Concat, Relu, GlobalAveragePool, ReduceMean, AveragePool, Softmax: the ONNX op, attributes as
    stored."""
    ins = _float_inputs(w, node)
    w.nodes.append(helper.make_node(node.op, ins, [node.outputs[0]], **node.attrs))


def _emit_island(w: _Writer, node: IntNode, ins: list[str]) -> None:
    """Inline the island's ONNX graph: its inputs read the FP32 views, internal names get a unique prefix."""
    island = onnx.load_from_string(node.arrays["onnx"].tobytes())
    rename = {i.name: x for i, x in zip(island.graph.input, ins)}
    rename.update({o.name: node.outputs[0] for o in island.graph.output})
    prefix = w.fresh(node.name)

    def name(n: str) -> str:
        return rename.get(n, f"{prefix}/{n}") if n else n
    for init in island.graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = name(init.name)
        w.inits.append(t)
    for n in island.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = name(n.name or n.op_type)
        m.input[:] = [name(i) for i in n.input]
        m.output[:] = [name(o) for o in n.output]
        w.nodes.append(m)


def _emit_activation(w: _Writer, op: str, x: str, out: str, a: dict, x_again: str | None = None) -> None:
    """A float activation in opset-17 ONNX ops (SiLU = x * Sigmoid(x); GELU and Mish spelled out).

    A gated SiLU (``gate_scale`` in ``a``: ``quant.modules.GatedSiLU``) quantizes its sigmoid:
    ``Mul(x, DQ(Q(Sigmoid(x))))``; with ``x_again`` (a second DequantizeLinear of the same codes) onnxruntime
    runs it as QLinearSigmoid + QLinearMul."""
    def add(op_type, ins, **attrs):
        y = w.fresh(f"{out}_{op_type.lower()}")
        w.nodes.append(helper.make_node(op_type, ins, [y], **attrs))
        return y

    def c(v):
        return w.const(f"{out}_c", np.array(v, np.float32))
    if op == "Silu" and "gate_scale" in a:
        gate = QParams(a["gate_scale"], a["gate_zero_point"], a["gate_bits"], a["gate_signed"])
        codes = add("QuantizeLinear", [add("Sigmoid", [x]), *w.qparams_inputs(f"{out}_gate", gate)])
        y = add("Mul", [x_again or x, add("DequantizeLinear", [codes, *w.qparams_inputs(f"{out}_gate", gate)])])
    elif op == "Silu":
        y = add("Mul", [x, add("Sigmoid", [x])])
    elif op == "HardSigmoid":
        y = add("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
    elif op == "LeakyRelu":
        y = add("LeakyRelu", [x], alpha=float(a["alpha"]))
    elif op == "Elu":
        y = add("Elu", [x], alpha=float(a["alpha"]))
    elif op == "Gelu":
        if a.get("approximate") == "tanh":
            inner = add("Mul", [add("Add", [x, add("Mul", [c(0.044715), add("Mul", [x, add("Mul", [x, x])])])]),
                                c(float(np.sqrt(2 / np.pi)))])
            y = add("Mul", [add("Mul", [x, c(0.5)]), add("Add", [add("Tanh", [inner]), c(1.0)])])
        else:
            y = add("Mul", [add("Mul", [x, c(0.5)]), add("Add", [add("Erf", [add("Div", [x, c(float(np.sqrt(2)))])]),
                                                                 c(1.0)])])
    elif op == "Mish":
        y = add("Mul", [x, add("Tanh", [add("Softplus", [x])])])
    else:  # Sigmoid, HardSwish, Tanh: the ONNX op of that name
        y = add(op, [x])
    w.nodes.append(helper.make_node("Identity", [y], [out]))


def _emit_lut(w: _Writer, node: IntNode) -> None:
    """Codes -> codes through the node's table: ``Gather(table, Cast(x, int32))`` on the stored (uint8) codes."""
    x, out = node.inputs[0], node.outputs[0]
    qx, qy = w.g.qparams[x], w.g.qparams[out]
    if qx.bits > 8 or qy.bits > 8 or w.activations == "float":  # (no 65536-entry tables) DQ -> f -> Q
        y = w.fresh(f"{out}_f")
        gated = "gate_scale" in node.attrs
        _emit_activation(w, LUT_ACTIVATIONS[node.attrs["fn"]], w.dq(x), y, node.attrs,
                         x_again=w.dq(x) if gated else None)
        w.q(y, out, node.attrs.get("clamp"))
        return
    x_off, _, _ = _container(qx)
    y_off, _, dtype = _container(qy)
    lo, hi = node.attrs.get("clamp") or (qy.qmin, qy.qmax)
    table = np.zeros(256, dtype=dtype)  # indexed by the stored code (code + offset); unused entries stay 0
    table[qx.qmin + x_off: qx.qmax + x_off + 1] = np.clip(node.arrays["table"], lo, hi) + y_off
    idx = w.fresh(f"{out}_idx")
    w.nodes.append(helper.make_node("Cast", [x], [idx], to=TensorProto.INT32))
    w.nodes.append(helper.make_node("Gather", [w.const(f"{out}_table", table), idx], [out], axis=0))


def depth_multiplier(node: IntNode) -> int:
    """m of a depthwise conv with several outputs per input channel (groups = input channels, ``m * C`` outputs),
    else 1. onnxruntime runs QLinearConv with m > 1 as a generic grouped conv, about 30x slower than its depthwise
    kernel (measured: 0.75 ms vs 0.02 ms for 32 -> 96 channels at 16x16), so the export repeats the input
    channels on codes first and writes an m = 1 depthwise conv: the same products and sums, bit for bit."""
    group, (out_channels, in_per_group) = node.attrs.get("group", 1), node.arrays["w"].shape[:2]
    return out_channels // group if group > 1 and in_per_group == 1 and out_channels > group else 1


def _emit_quantize(w: _Writer, node: IntNode) -> None:
    w.q(w.as_float(node.inputs[0]), node.outputs[0], node.attrs.get("clamp"))


def _emit_dequantize(w: _Writer, node: IntNode) -> None:
    x = node.inputs[0]
    w.nodes.append(helper.make_node("DequantizeLinear", [x, *w.qparams_inputs(x, w.g.qparams[x])], [node.outputs[0]]))


def _emit_conv(w: _Writer, node: IntNode) -> None:
    a = node.attrs
    group, multiplier = a["group"], depth_multiplier(node)
    if multiplier > 1:  # onnxruntime's fast int8 depthwise kernel needs one output per input channel
        x = w.dq(node.inputs[0], codes=w.repeat_channels(node.inputs[0], group, multiplier))
        group = node.arrays["w"].shape[0]
    else:
        x = w.dq(node.inputs[0])
    ins = [x, w.weight_dq(node)]
    b = w.bias_dq(node, node.inputs[0])
    w.float_op("Conv", ins + ([b] if b else []), node, strides=a["strides"], pads=a["pads"],
               dilations=a["dilations"], group=group, kernel_shape=list(node.arrays["w"].shape[2:]))


def _emit_gemm(w: _Writer, node: IntNode) -> None:
    ins = [w.dq(node.inputs[0]), w.weight_dq(node)]
    b = w.bias_dq(node, node.inputs[0])
    w.float_op("Gemm", ins + ([b] if b else []), node, transB=1)


def _emit_add(w: _Writer, node: IntNode) -> None:
    w.float_op("Add", [w.dq(i) for i in node.inputs], node)


def _emit_mul(w: _Writer, node: IntNode) -> None:
    w.float_op("Mul", [w.dq(i) for i in node.inputs], node)


def _emit_concat(w: _Writer, node: IntNode) -> None:
    w.float_op("Concat", [w.dq(i) for i in node.inputs], node, axis=node.attrs["axis"])


def _emit_relu(w: _Writer, node: IntNode) -> None:
    w.float_op("Relu", [w.dq(node.inputs[0])], node)


def _emit_global_average_pool(w: _Writer, node: IntNode) -> None:
    if node.attrs["keepdims"]:
        w.float_op("GlobalAveragePool", [w.dq(node.inputs[0])], node)
    else:
        w.float_op("ReduceMean", [w.dq(node.inputs[0])], node, axes=[2, 3], keepdims=0)


def _emit_average_pool(w: _Writer, node: IntNode) -> None:
    w.float_op("AveragePool", [w.dq(node.inputs[0])], node, kernel_shape=node.attrs["kernel_shape"],
               strides=node.attrs["strides"])


def _emit_data_movement(w: _Writer, node: IntNode) -> None:
    """Scale-preserving ops run on the integer codes (uint8); 16-bit containers go through float
    because onnxruntime's MaxPool / Pad have no 16-bit integer kernels."""
    op, a, out = node.op, node.attrs, node.outputs[0]
    is_float = out not in w.g.qparams  # a float tensor of a mixed-precision graph: the same op in FP32
    q = w.g.qparams[out] if not is_float else QParams(1.0, 0, 16, True)
    offset, _, dtype = _container(q)
    on_codes = q.bits <= 8 and op != "MaxPool"  # onnxruntime's uint8 MaxPool is slow; through float it is exact
    src = node.inputs[0] if on_codes else w.as_float(node.inputs[0])
    dst = out if (on_codes or is_float) else w.fresh(f"{out}_{op.lower()}")
    ins, attrs = [src], {}
    if op == "MaxPool":
        attrs = {"kernel_shape": a["kernel_shape"], "strides": a["strides"], "pads": a["pads"]}
    elif op == "Slice":
        ins += [w.const(f"{out}_{k}", np.array(a[k], dtype=np.int64)) for k in ("starts", "ends", "axes", "steps")]
    elif op == "Pad":
        value = np.array(q.zero_point + offset, dtype=dtype) if on_codes else np.array(0.0, dtype=np.float32)
        ins += [w.const(f"{out}_pads", np.array(a["pads"], dtype=np.int64)), w.const(f"{out}_value", value)]
        attrs = {"mode": "constant"}
    elif op == "Flatten":
        attrs = {"axis": a["axis"]}
    elif op == "Reshape":
        ins.append(w.const(f"{out}_shape", np.array(a["shape"], dtype=np.int64)))
    elif op == "Transpose":
        attrs = {"perm": list(a["perm"])}
    elif op == "Gather":
        ins.append(w.const(f"{out}_index", np.array(a["index"], dtype=np.int64)))
        attrs = {"axis": a["axis"]}
    elif op == "Resize":
        ins += ["", w.const(f"{out}_scales", np.array(a["scales"], dtype=np.float32))]
        attrs = {"mode": "nearest", "coordinate_transformation_mode": a["coordinate_transformation_mode"],
                 "nearest_mode": a["nearest_mode"]}
    w.nodes.append(helper.make_node(op, ins, [dst], **attrs))
    if not (on_codes or is_float):
        w.q(dst, out)


# IntGraph op (``intgraph.OP_CATEGORIES``) -> the function writing it, one per op (as ``engine.run.OPS``). Integer
# ops are written as DequantizeLinear -> the float op -> QuantizeLinear, which onnxruntime fuses into its integer
# kernels; float ops read FP32 views of their inputs; data movement (on codes, or on a float tensor) has one writer.
EMITTERS: dict[str, Callable[[_Writer, IntNode], None]] = {
    "QuantizeLinear": _emit_quantize,
    "DequantizeLinear": _emit_dequantize,
    "QLinearConv": _emit_conv,
    "QGemm": _emit_gemm,
    "QLinearAdd": _emit_add,
    "QLinearMul": _emit_mul,
    "QLinearConcat": _emit_concat,
    "QLinearRelu": _emit_relu,
    "QLinearGlobalAveragePool": _emit_global_average_pool,
    "QLinearAveragePool": _emit_average_pool,
    "LUT": _emit_lut,
    **dict.fromkeys(DATA_MOVEMENT, _emit_data_movement),
    "Conv": _emit_float_weighted,
    "Gemm": _emit_float_weighted,
    "Clip": _emit_float_clip,
    "Cast": _emit_cast,
    **dict.fromkeys(("Add", "Mul", "Concat", "Relu", "GlobalAveragePool", "ReduceMean", "AveragePool", "Softmax"),
                    _emit_float_as_stored),
    **dict.fromkeys(ACTIVATION_OPS, _emit_float_activation),
    "FloatIsland": _emit_float_island,
}
# IntGraph ops with no writer, and why
NOT_EXPORTABLE: dict[str, str] = {
    "QLinearConvTranspose": "only read from QDQ files (io.onnx_qdq_import), which already are its ONNX form; "
                            "lowering keeps transposed convolutions in float (a float island)",
}


def _emit(w: _Writer, node: IntNode) -> None:
    emitter = EMITTERS.get(node.op)
    if emitter is None:
        why = NOT_EXPORTABLE.get(node.op)
        raise ValueError(f"IntGraph op {node.op} has no ONNX writer" + (f": {why}" if why else ""))
    emitter(w, node)


ACTIVATION_EXPORTS = ("float", "table")


def to_onnx(g: IntGraph, *, weight_type: str = "auto", activations: str = "float") -> onnx.ModelProto:
    """Write ``g`` as a QDQ ONNX model with a dynamic batch dimension (``weight_type``, ``activations``: see the
    module docstring)."""
    resolve_weight_type(weight_type)  # validates the option
    if activations not in ACTIVATION_EXPORTS:
        from ..errors import EdgeslimError
        raise EdgeslimError(f"invalid activation export {activations!r}: use float or table")
    w = _Writer(g, weight_type, activations)
    for node in g.nodes:
        _emit(w, node)
    wide = any(q.bits > 8 for q in g.qparams.values()) or any(n.attrs.get("w_bits", 8) > 8 for n in g.nodes)
    x = helper.make_tensor_value_info(g.input_name, TensorProto.FLOAT, ["N", *g.input_shape])
    ys = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])
          for name, shape in zip(g.output_names, g.output_shapes)]
    graph = helper.make_graph(w.nodes, "edgeslim_int", [x], ys, initializer=w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET_WIDE if wide else OPSET_8BIT)],
                              producer_name="edgeslim")
    model.ir_version = 8 if not wide else 10
    onnx.checker.check_model(model)
    return model


def set_io_names(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """Rename the graph's inputs and outputs (in order) to ``inputs`` / ``outputs``: the INT8 file keeps the FP32
    file's interface. An internal tensor that already carries one of the new names is renamed out of the way."""
    g = model.graph
    old = [i.name for i in g.input][:len(inputs)] + [o.name for o in g.output][:len(outputs)]
    new = list(inputs[:len(old)]) + list(outputs)
    mapping = {o: n for o, n in zip(old, new) if o != n}
    if not mapping:
        return model
    taken = set(mapping.values()) - set(mapping)
    tensors = {t for n in g.node for t in (*n.input, *n.output)} | {i.name for i in g.initializer}
    for name in taken & tensors:
        mapping[name] = f"{name}__internal"
    rename = lambda t: mapping.get(t, t)  # noqa: E731
    for n in g.node:
        n.input[:] = [rename(t) for t in n.input]
        n.output[:] = [rename(t) for t in n.output]
    for vi in (*g.input, *g.output, *g.value_info):
        vi.name = rename(vi.name)
    for init in g.initializer:
        init.name = rename(init.name)
    return model


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> onnx.ModelProto:
    """Add (or replace) ``metadata_props`` entries."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*keep, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Write atomically, through a fresh temporary file next to ``path`` (never a planted link; ``io.atomic``)."""
    return atomic_write_bytes(path, model.SerializeToString(), "ONNX file")
