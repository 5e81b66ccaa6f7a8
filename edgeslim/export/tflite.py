"""IntGraph -> LiteRT (TFLite) int8 flatbuffer, bit-exact with the engine's ``requant="tflite"`` mode.

    tg = prepare_graph(q.intgraph, calib)          # TFLite-representable copy (int8 logits, see below)
    fb, info = to_tflite(tg)                        # bytes of a .tflite file, what it holds
    codes = engine.run(tg, x, requant="tflite")     # what LiteRT / TFLM compute, in numpy

Mapping (schema ``tensorflow/lite/schema/schema.fbs``; kernels ``tensorflow/lite/kernels``):

* layout NHWC: every 4-D IntGraph tensor (NCHW) is stored transposed; reshapes of 4-D tensors go through
  TRANSPOSE to NCHW first, so flatten order is PyTorch's; batch 1 (microcontrollers have fixed shapes);
* activations int8: an unsigned 8-bit code ``q`` (zero point ``z``) is stored as ``q - 128`` (zero point
  ``z - 128``), the same real value; weights int8 symmetric per channel (zero point 0, quantized_dimension 0
  for CONV_2D / FULLY_CONNECTED, 3 for DEPTHWISE_CONV_2D), biases int32 with scale ``s_in * s_w``;
* QLinearConv -> CONV_2D / DEPTHWISE_CONV_2D (padding SAME where it equals PyTorch's, else PAD + VALID),
  QGemm -> FULLY_CONNECTED, QLinearAdd -> ADD, QLinearMul -> MUL, QLinearConcat -> QUANTIZE (int8 -> int8, for
  inputs with other scales: TFLite's int8 CONCATENATION needs equal parameters) + CONCATENATION,
  QLinearAveragePool / QLinearGlobalAveragePool -> DEPTHWISE_CONV_2D with weights 1 / (kh * kw) (code 64)
  (``tflite_run.pool_as_depthwise``: one rounding, as onnxruntime's pools; AVERAGE_POOL_2D + QUANTIZE and MEAN
  round twice and part from the INT8 ONNX file on up to half the outputs; pools read from a file keep their op),
  MaxPool -> MAX_POOL_2D (explicit pads: PADV2 with -128), Pad -> PAD, Flatten / Reshape -> RESHAPE,
  Transpose -> TRANSPOSE, Slice -> STRIDED_SLICE, nearest Resize -> RESIZE_NEAREST_NEIGHBOR, QLinearRelu -> RELU / RELU6,
  LUT leaky ReLU -> LEAKY_RELU, any other LUT (SiLU, sigmoid, hard-swish, tanh, ...) -> its 256-entry int8
  table as CAST + ADD (int32) + GATHER: the same table the engine and the simulation use, integer, exact
  in every TFLite runtime; scalar-index Gather -> GATHER (int8 or float);
* float islands (softmax, PReLU, ``FloatIsland`` ONNX graphs, FP32 layers of a mixed plan) -> DEQUANTIZE, their
  float32 builtins (ONNX node by ONNX node), QUANTIZE where the IntGraph quantizes again; named in
  ``float_nodes`` (``float_ops``: the float builtins);
* fused activations: an IntGraph clamp equal to TFLite's fused RELU / RELU6 range is fused; any other clamp
  becomes MAXIMUM / MINIMUM with an int8 constant;
* float input / output (QUANTIZE at the input, DEQUANTIZE at outputs) by default, ``io="int8"`` for int8.

Activations below 8 bits live in int8 tensors with their narrower range kept by clamps (fused activations,
MAXIMUM / MINIMUM, or the table). Refused with one ``EdgeslimError`` naming the fix: activations wider than 8 bits,
weights wider than 8 bits or with non-zero zero points, grouped (non-depthwise) convolutions, FP16 nodes, and ops
with no (float) builtin here (ConvTranspose, ONNX ops outside ``_onnx_float``'s list).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import tflite_ops
from ..engine.tflite_run import LOGISTIC_Q, gate_qparams, pool_as_depthwise
from ..errors import EdgeslimError
from ..intgraph import IntGraph, IntNode, QParams
from .tflite_fb import FlatModel, Tensor, to_bytes
from .tflite_float import FloatIslands
from .tflite_layout import (ACTIVATION_CODES, NHWC, act_code, inverse, int8_offset, layout, same_bytes, same_stored,
                            stored, then)
from .tflite_prepare import (ACTIVATIONS, ELEMENTWISE_ISLANDS, check_graph, logit_qparams, prepare_graph,
                             tensor_shapes)

__all__ = ["IO_TYPES", "NHWC", "check_graph", "ACTIVATIONS", "ELEMENTWISE_ISLANDS", "prepare_graph", "logit_qparams",
           "tensor_shapes", "ACTIVATION_CODES", "to_tflite", "export_tflite"]


IO_TYPES = ("float", "int8")


class Exporter(FloatIslands):
    """Walks the IntGraph once and appends the TFLite tensors and operators of each node (the float islands'
    writers in ``FloatIslands``)."""

    def __init__(self, g: IntGraph, io: str) -> None:
        self.g, self.io = g, io
        self.shapes = tensor_shapes(g)
        self.m = FlatModel()
        self.ids: dict[str, int] = {}  # IntGraph tensor -> flatbuffer tensor
        self.count = 0
        self.lut_tables: list[str] = []
        self.dequantized: dict[str, int] = {}  # int8 tensor -> its DEQUANTIZE output (float islands read it)
        self.float_nodes: list[str] = []  # IntGraph nodes written as float TFLite ops

    # tensors ---------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base};{self.count}"

    def act(self, name: str, q: QParams, shape) -> int:
        """A new int8 activation tensor (stored layout) with ``q`` moved to the int8 container."""
        return self.m.add_tensor(Tensor(name, list(shape), np.int8, scale=[float(np.float32(q.scale))],
                                        zero_point=[q.zero_point - int8_offset(q)]))

    def out(self, node: IntNode) -> int:
        """The node's output tensor: int8 with its parameters, or float32 for a float-island tensor."""
        name = node.outputs[0]
        if name in self.g.qparams:
            idx = self.act(name, self.g.qparams[name], stored(self.shapes[name]))
        else:
            idx = self.m.add_tensor(Tensor(name, stored(self.shapes[name]), np.float32))
        self.ids[name] = idx
        return idx

    def like(self, x: int, base: str, shape) -> int:
        """A new tensor with the type and parameters of tensor ``x`` and another shape."""
        t = self.m.tensors[x]
        return self.m.add_tensor(Tensor(self.fresh(base), [int(v) for v in shape], t.dtype, scale=t.scale,
                                        zero_point=t.zero_point))

    def fin(self, name: str) -> int:
        """Tensor ``name`` as float32: a float-island tensor as it is, an int8 one through DEQUANTIZE (once)."""
        if name not in self.g.qparams:
            return self.ids[name]
        if name not in self.dequantized:
            x = self.ids[name]
            f = self.m.add_tensor(Tensor(self.fresh(f"{name}_dequantized"), self.m.tensors[x].shape, np.float32))
            self.m.add_op("DEQUANTIZE", [x], [f])
            self.dequantized[name] = f
        return self.dequantized[name]

    def src(self, node: IntNode) -> int:
        """The input of a data-movement node: int8 as it is, or float32 where the node's output is a float tensor."""
        name = node.inputs[0]
        return self.fin(name) if node.outputs[0] not in self.g.qparams else self.ids[name]

    def fconst(self, name: str, value, ndim: int) -> int:
        """A float32 constant broadcast against a tensor of logical rank ``ndim`` (NCHW), stored as that tensor is."""
        v = np.asarray(value, np.float32)
        if v.ndim < ndim:
            v = v.reshape((1,) * (ndim - v.ndim) + v.shape)
        return self.m.const(self.fresh(name), np.ascontiguousarray(v.transpose(layout(v.ndim))))

    def logical(self, x: int, shape, name: str) -> int:
        """Tensor ``x`` (logical ``shape``) in logical (NCHW) element order: a TRANSPOSE for 4-D tensors."""
        if len(shape) != 4:
            return x
        return self._transpose(x, inverse(NHWC), list(shape), name, None)

    def stored_from_logical(self, x: int, shape, name: str) -> int:
        """The inverse of ``logical``: a 4-D tensor held in NCHW order moved to the stored NHWC layout."""
        if len(shape) != 4:
            return x
        return self._transpose(x, list(NHWC), stored(shape), name, None)

    def i32(self, name: str, values) -> int:
        return self.m.const(self.fresh(name), np.asarray(values, np.int32))

    # clamps ----------------------------------------------------------------
    def fused(self, node: IntNode, name: str, fusable: bool = True) -> tuple[str, tuple[int, int] | None]:
        """(fused activation, leftover clamp in int8 codes or None) for the node's IntGraph clamp."""
        q = self.g.qparams[name]
        off = int8_offset(q)
        lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
        lo, hi = max(int(lo), q.qmin) - off, min(int(hi), q.qmax) - off
        for act in ("NONE", "RELU", "RELU6") if fusable else ("NONE",):
            if tflite_ops.activation_range(act, q.scale, q.zero_point - off) == (lo, hi):
                return act, None
        return "NONE", (lo, hi)

    def clamp_ops(self, idx: int, name: str, clamp: tuple[int, int] | None) -> int:
        """MAXIMUM / MINIMUM with int8 constants (same parameters) for a clamp no fused activation equals."""
        if clamp is None:
            return idx
        q = self.g.qparams[name]
        t = self.m.tensors[idx]
        for op, bound, limit in (("MAXIMUM", clamp[0], -128), ("MINIMUM", clamp[1], 127)):
            if bound == limit:
                continue
            c = self.m.const(self.fresh(f"{name}_{op.lower()}"), np.array([bound], np.int8), scale=t.scale,
                             zero_point=t.zero_point)
            y = self.act(self.fresh(name), q, t.shape)
            self.m.add_op(op, [idx, c], [y])
            idx = y
        return idx

    def finish(self, node: IntNode, emit, fusable: bool = True) -> None:
        """Emit the op (``emit(activation, out index)``), then any leftover clamp, into the node's output;
        ``fusable``: the op has a fused activation field."""
        name = node.outputs[0]
        act, rest = self.fused(node, name, fusable)
        if rest is None:
            emit(act, self.out(node))
            return
        q = self.g.qparams[name]
        tmp = self.act(self.fresh(name), q, stored(self.shapes[name]))
        emit(act, tmp)
        self.ids[name] = self.clamp_ops(tmp, name, rest)

    def requant(self, idx: int, src_q: QParams, dst_q: QParams, shape, name: str) -> int:
        """int8 -> int8 QUANTIZE to ``dst_q`` (no op when the stored parameters are equal)."""
        if same_stored(src_q, dst_q):
            return idx
        y = self.act(self.fresh(name), dst_q, shape)
        self.m.add_op("QUANTIZE", [idx], [y])
        return y

    # nodes -----------------------------------------------------------------
    def run(self) -> FlatModel:
        g = self.g
        shape_in = stored((1, *g.input_shape))
        for node in g.nodes:
            handler = getattr(self, f"op_{node.op}", None)
            if handler is None:
                raise EdgeslimError(f"op {node.op} ({node.name}) has no TFLite builtin in edgeslim's exporter: "
                                    "use --formats onnx, or open an issue with the model")
            handler(node, shape_in)
        missing = [n for n in g.output_names if n not in self.ids]
        if missing:
            raise EdgeslimError(f"outputs {missing} were not produced by the TFLite export: open an issue")
        self.m.outputs = [self.ids[n] for n in g.output_names]
        return self.m

    def op_QuantizeLinear(self, node: IntNode, shape_in) -> None:
        if node.inputs[0] in self.ids:  # a float tensor computed in the file (after a float SOFTMAX)
            x = self.ids[node.inputs[0]]
            self.finish(node, lambda act, y: self.m.add_op("QUANTIZE", [x], [y]), fusable=False)
            return
        if node.inputs[0] != self.g.input_name:
            raise EdgeslimError(f"QuantizeLinear {node.name} reads a float tensor inside the model (a float island): "
                                "TFLite export needs an all-integer graph")
        if self.io == "int8":
            idx = self.out(node)
            self.m.inputs = [idx]
            return
        x = self.m.add_tensor(Tensor(self.g.input_name, shape_in, np.float32))
        self.m.inputs = [x]
        self.finish(node, lambda act, y: self.m.add_op("QUANTIZE", [x], [y]), fusable=False)

    def op_DequantizeLinear(self, node: IntNode, shape_in) -> None:
        src = self.ids[node.inputs[0]]
        if self.io == "int8" and node.outputs[0] in self.g.output_names:
            self.ids[node.outputs[0]] = src
            return
        y = self.m.add_tensor(Tensor(node.outputs[0], stored(self.shapes[node.outputs[0]]), np.float32))
        self.m.add_op("DEQUANTIZE", [src], [y])
        self.ids[node.outputs[0]] = y

    def op_Identity(self, node: IntNode, shape_in) -> None:
        self.ids[node.outputs[0]] = self.src(node)

    def op_Softmax(self, node: IntNode, shape_in) -> None:
        """A float island TFLite runs as a float builtin: DEQUANTIZE, SOFTMAX (float32), recorded in ``float_ops``."""
        self.float_op(node, "Softmax")
        self._softmax(node, self.fin(node.inputs[0]), node.attrs.get("axis", -1))

    def _softmax(self, node: IntNode, x: int, axis: int) -> None:
        """SOFTMAX reduces the last stored axis: other axes are swapped to the end by TRANSPOSE and back."""
        nd = len(self.shapes[node.outputs[0]])
        p = layout(nd).index(axis % nd)
        opts = ("SoftmaxOptions", {"Beta": 1.0})
        if p == nd - 1:
            self.m.add_op("SOFTMAX", [x], [self.out(node)], opts)
            return
        perm = list(range(nd))
        perm[p], perm[-1] = perm[-1], perm[p]
        shape = self.m.tensors[x].shape
        moved = self._transpose(x, perm, [shape[i] for i in perm], node.name)
        y = self.like(moved, f"{node.name}_softmax", self.m.tensors[moved].shape)
        self.m.add_op("SOFTMAX", [moved], [y], opts)
        self._alias_output(node, self._transpose(y, perm, shape, node.name))

    def _gather(self, node: IntNode, x: int, in_shape, axis: int, index) -> None:
        """GATHER along a logical axis (4-D tensors in NCHW order around it, as ONNX indexes them)."""
        out_shape = self.shapes[node.outputs[0]]
        axis = axis % len(in_shape)
        index = np.asarray(index, np.int64) % in_shape[axis]
        x = self.logical(x, in_shape, node.name)
        y = self.like(x, f"{node.name}_gather", list(out_shape))
        positions = self.m.const(self.fresh(f"{node.name}_index"), index.astype(np.int32))
        self.m.add_op("GATHER", [x, positions], [y], ("GatherOptions", {"Axis": axis}))
        self._alias_output(node, self.stored_from_logical(y, out_shape, node.name))

    def op_Gather(self, node: IntNode, shape_in) -> None:
        """A scalar-index Gather (the axis is removed; channel shuffles), int8 or float: GATHER."""
        self._gather(node, self.src(node), self.shapes[node.inputs[0]], node.attrs["axis"], node.attrs["index"])

    def op_Cast(self, node: IntNode, shape_in) -> None:
        if node.attrs.get("to") != "float32" or node.inputs[0] in self.g.qparams:
            raise EdgeslimError(f"Cast {node.name} to {node.attrs.get('to')}: FP16 parts of a mixed-precision model "
                                "do not export to TFLite int8: use an all-int8 plan")
        self.ids[node.outputs[0]] = self.ids[node.inputs[0]]  # float32 stays float32

    def _padding(self, node: IntNode, k, in_shape, out_shape, pad_value: int | None) -> tuple[int, int]:
        """(TFLite padding, input index): SAME when it equals the IntGraph pads, else an explicit PAD / PADV2."""
        at = node.attrs
        pads = list(at.get("pads", (0, 0, 0, 0)))
        src = self.src(node)  # float32 for a float conv (DEQUANTIZE of an int8 input)
        if not any(pads):
            return 1, src  # VALID
        strides, dil = at["strides"], at.get("dilations", (1, 1))
        same = True
        for d in range(2):
            eff = (k[d] - 1) * dil[d] + 1
            total = max((out_shape[2 + d] - 1) * strides[d] + eff - in_shape[2 + d], 0)
            same &= -(-in_shape[2 + d] // strides[d]) == out_shape[2 + d] and \
                (total // 2, total - total // 2) == (pads[d], pads[d + 2])
        if same:
            return 0, src
        padded = [int(in_shape[0]), in_shape[2] + pads[0] + pads[2], in_shape[3] + pads[1] + pads[3], in_shape[1]]
        y = self.like(src, f"{node.name}_pad", padded)
        paddings = self.i32(f"{node.name}_paddings", [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])
        if pad_value is None:
            self.m.add_op("PAD", [src, paddings], [y])  # int8: the zero point; float: 0.0
        else:  # the lowest value (max pooling): -128 in int8, -inf in float
            t = self.m.tensors[src]
            value = np.array([pad_value], np.int8) if t.dtype == np.int8 else np.array([-np.inf], np.float32)
            c = self.m.const(self.fresh(f"{node.name}_pad_value"), value, scale=t.scale, zero_point=t.zero_point)
            self.m.add_op("PADV2", [src, paddings, c], [y])
        return 1, y

    def _bias(self, node: IntNode, in_q: QParams) -> int | None:
        a = node.arrays
        o = a["w"].shape[0]
        # a layer without bias gets zeros: LiteRT's int8 DEPTHWISE_CONV_2D requires the tensor (TFLM crashes without)
        bias = np.broadcast_to(np.asarray(a.get("bias", np.zeros(o, np.int64)), np.int64).reshape(-1), (o,))
        if np.abs(bias).max(initial=0) >= 1 << 31:
            raise EdgeslimError(f"layer {node.name}: bias does not fit int32: use --w-bits / --a-bits 8")
        scale = (np.float32(in_q.scale) * a["w_scale"].astype(np.float32)).astype(np.float32).reshape(-1)
        return self.m.const(f"{node.name}_bias", bias.astype(np.int32), scale=[float(s) for s in scale],
                            zero_point=[0] * len(scale))

    def _weights(self, node: IntNode, w: np.ndarray, dim: int) -> int:
        scale = node.arrays["w_scale"].astype(np.float32).reshape(-1)
        return self.m.const(f"{node.name}_weights", w.astype(np.int8), scale=[float(s) for s in scale],
                            zero_point=[0] * len(scale), quantized_dimension=dim if len(scale) > 1 else 0)

    def op_QLinearConv(self, node: IntNode, shape_in) -> None:
        a, at = node.arrays, node.attrs
        w = np.asarray(a["w"])
        o, cg, kh, kw = w.shape
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        c_in = in_shape[1]
        padding, x = self._padding(node, (kh, kw), in_shape, out_shape, None)
        in_q = self.g.qparams[node.inputs[0]]
        bias = self._bias(node, in_q)
        ins = [x, None, bias if bias is not None else -1]
        sh, sw = at["strides"]
        dh, dw = at["dilations"]
        if at["group"] == 1:
            ins[1] = self._weights(node, w.transpose(0, 2, 3, 1), 0)  # OHWI
            opts = ("Conv2DOptions", {"Padding": padding, "StrideW": sw, "StrideH": sh, "DilationWFactor": dw,
                                      "DilationHFactor": dh})
            code = "CONV_2D"
        elif at["group"] == c_in and cg == 1:
            ins[1] = self._weights(node, w.transpose(1, 2, 3, 0), 3)  # 1, H, W, O
            opts = ("DepthwiseConv2DOptions", {"Padding": padding, "StrideW": sw, "StrideH": sh,
                                               "DepthMultiplier": o // c_in, "DilationWFactor": dw,
                                               "DilationHFactor": dh})
            code = "DEPTHWISE_CONV_2D"
        else:
            raise EdgeslimError(f"conv {node.name} is grouped ({at['group']} groups of {c_in} channels): TFLite int8 "
                                "export supports regular and depthwise convolutions only")

        def emit(act, y):
            opts[1]["FusedActivationFunction"] = act_code(act)
            self.m.add_op(code, ins, [y], opts)
        self.finish(node, emit)

    def op_QGemm(self, node: IntNode, shape_in) -> None:
        if node.attrs.get("float_output"):
            raise EdgeslimError(f"layer {node.name} has float outputs: run export.tflite.prepare_graph first")
        in_shape = self.shapes[node.inputs[0]]
        x = self.ids[node.inputs[0]]
        if len(in_shape) != 2:
            x = self._reshape(x, in_shape, (in_shape[0], int(np.prod(in_shape[1:]))), node.name)
        in_q = self.g.qparams[node.inputs[0]]
        w = self._weights(node, np.asarray(node.arrays["w"]).reshape(node.arrays["w"].shape[0], -1), 0)
        bias = self._bias(node, in_q)

        def emit(act, y):
            self.m.add_op("FULLY_CONNECTED", [x, w, bias if bias is not None else -1], [y],
                          ("FullyConnectedOptions", {"FusedActivationFunction": act_code(act)}))
        self.finish(node, emit)

    def _binary(self, node: IntNode, code: str) -> None:
        a, b = (self.ids[n] for n in node.inputs[:2])
        for n in node.inputs[:2]:
            if len(self.shapes[n]) != len(self.shapes[node.outputs[0]]):
                raise EdgeslimError(f"{node.op} {node.name}: inputs of different rank are not exportable to TFLite yet")
        self.finish(node, lambda act, y: self.m.add_op(code, [a, b], [y], (f"{code.capitalize()}Options",
                                                                          {"FusedActivationFunction": act_code(act)})))

    def op_QLinearAdd(self, node: IntNode, shape_in) -> None:
        self._binary(node, "ADD")

    def op_QLinearMul(self, node: IntNode, shape_in) -> None:
        self._binary(node, "MUL")

    def op_QLinearConcat(self, node: IntNode, shape_in) -> None:
        qy = self.g.qparams[node.outputs[0]]
        if len(node.inputs) == 1:  # a requantization (what import_tflite makes of an int8 -> int8 QUANTIZE)
            src = self.ids[node.inputs[0]]
            self.finish(node, lambda act, y: self.m.add_op("QUANTIZE", [src], [y]), fusable=False)
            return
        parts = []
        for n in node.inputs:
            parts.append(self.requant(self.ids[n], self.g.qparams[n], qy, stored(self.shapes[n]), f"{node.name}_in"))
        ndim = len(self.shapes[node.outputs[0]])
        axis = layout(ndim).index(node.attrs.get("axis", 1) % ndim)
        self.finish(node, lambda act, y: self.m.add_op("CONCATENATION", parts, [y], (
            "ConcatenationOptions", {"Axis": axis, "FusedActivationFunction": act_code(act)})))

    def _avgpool(self, node: IntNode, k, s) -> None:
        in_q, out_q = self.g.qparams[node.inputs[0]], self.g.qparams[node.outputs[0]]
        in_shape = self.shapes[node.inputs[0]]
        ho, wo = (in_shape[2] - k[0]) // s[0] + 1, (in_shape[3] - k[1]) // s[1] + 1
        pooled_shape = [in_shape[0], ho, wo, in_shape[1]]
        pooled = self.act(self.fresh(f"{node.name}_pool"), in_q, pooled_shape)
        self.m.add_op("AVERAGE_POOL_2D", [self.ids[node.inputs[0]]], [pooled], (
            "Pool2DOptions", {"Padding": 1, "StrideW": s[1], "StrideH": s[0], "FilterWidth": k[1],
                              "FilterHeight": k[0]}))
        y = self.requant(pooled, in_q, out_q, pooled_shape, node.name)
        lo, hi = node.attrs.get("clamp") or (out_q.qmin, out_q.qmax)
        off = int8_offset(out_q)
        clamp = (max(lo, out_q.qmin) - off, min(hi, out_q.qmax) - off)
        self.ids[node.outputs[0]] = self.clamp_ops(y, node.outputs[0], None if clamp == (-128, 127) else clamp)

    def _pool_conv(self, node: IntNode, kernel, strides, emit_to=None) -> None:
        """An average pool as ``tflite_run.pool_as_depthwise``'s DEPTHWISE_CONV_2D (VALID, unit weights): one
        rounding, as onnxruntime's pools round. ``emit_to``: (int8 tensor index) instead of the node's output."""
        c = self.shapes[node.inputs[0]][1]
        a = pool_as_depthwise(c, kernel)
        in_q = self.g.qparams[node.inputs[0]]
        w = self.m.const(f"{node.name}_weights", a["w"].transpose(1, 2, 3, 0).astype(np.int8),
                         scale=[float(v) for v in a["w_scale"]], zero_point=[0] * c, quantized_dimension=3)
        bias = self.m.const(f"{node.name}_bias", a["bias"].astype(np.int32), zero_point=[0] * c,
                            scale=[float(v) for v in (np.float32(in_q.scale) * a["w_scale"]).astype(np.float32)])
        x = self.ids[node.inputs[0]]

        def emit(act, y):
            self.m.add_op("DEPTHWISE_CONV_2D", [x, w, bias], [y], (
                "DepthwiseConv2DOptions", {"Padding": 1, "StrideW": int(strides[1]), "StrideH": int(strides[0]),
                                           "DepthMultiplier": 1, "DilationWFactor": 1, "DilationHFactor": 1,
                                           "FusedActivationFunction": act_code(act)}))
        if emit_to is None:
            self.finish(node, emit)
        else:
            emit("NONE", emit_to)

    def op_QLinearAveragePool(self, node: IntNode, shape_in) -> None:
        if node.attrs.get("tflite_op") == "AVERAGE_POOL_2D":  # read from a file (io.tflite_import): kept as it was
            self._avgpool(node, node.attrs["kernel_shape"], node.attrs["strides"])
        else:
            self._pool_conv(node, node.attrs["kernel_shape"], node.attrs["strides"])

    def op_QLinearGlobalAveragePool(self, node: IntNode, shape_in) -> None:
        if node.attrs.get("tflite_op") != "MEAN":
            self._global_pool_conv(node)
            return
        out_shape = self.shapes[node.outputs[0]]
        axes = self.i32(f"{node.name}_axes", [1, 2])
        x = self.ids[node.inputs[0]]
        if len(out_shape) == 4:
            self.finish(node, lambda act, y: self.m.add_op("MEAN", [x, axes], [y], ("ReducerOptions", {"KeepDims": True})),
                        fusable=False)
            return
        # keep_dims=False takes another kernel in LiteRT's reference resolver (measured 1 LSB off TFLM and the
        # 4-D path): always reduce to N,1,1,C, then RESHAPE (the same bytes)
        q = self.g.qparams[node.outputs[0]]
        pooled = self.act(self.fresh(f"{node.name}_mean"), q, [out_shape[0], 1, 1, out_shape[1]])
        self.m.add_op("MEAN", [x, axes], [pooled], ("ReducerOptions", {"KeepDims": True}))
        y = self._reshape(pooled, (out_shape[0], out_shape[1], 1, 1), out_shape, node.name)
        lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
        clamp = (max(lo, q.qmin) - int8_offset(q), min(hi, q.qmax) - int8_offset(q))
        self.ids[node.outputs[0]] = self.clamp_ops(y, node.outputs[0], None if clamp == (-128, 127) else clamp)

    def _global_pool_conv(self, node: IntNode) -> None:
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        kernel = in_shape[2:]
        if len(out_shape) == 4:
            self._pool_conv(node, kernel, (1, 1))
            return
        q = self.g.qparams[node.outputs[0]]  # keepdims=False: N,1,1,C then RESHAPE (the same bytes)
        pooled = self.act(self.fresh(f"{node.name}_mean"), q, [out_shape[0], 1, 1, out_shape[1]])
        self._pool_conv(node, kernel, (1, 1), emit_to=pooled)
        y = self._reshape(pooled, (out_shape[0], out_shape[1], 1, 1), out_shape, node.name)
        lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
        clamp = (max(lo, q.qmin) - int8_offset(q), min(hi, q.qmax) - int8_offset(q))
        self.ids[node.outputs[0]] = self.clamp_ops(y, node.outputs[0], None if clamp == (-128, 127) else clamp)

    def op_MaxPool(self, node: IntNode, shape_in) -> None:
        k, s = node.attrs["kernel_shape"], node.attrs["strides"]
        padding, x = self._padding(node, k, self.shapes[node.inputs[0]], self.shapes[node.outputs[0]], -128)
        self.m.add_op("MAX_POOL_2D", [x], [self.out(node)], (
            "Pool2DOptions", {"Padding": padding, "StrideW": s[1], "StrideH": s[0], "FilterWidth": k[1],
                              "FilterHeight": k[0]}))

    def op_Pad(self, node: IntNode, shape_in) -> None:
        pads = node.attrs["pads"]
        nd = len(pads) // 2
        pairs = [[pads[i], pads[i + nd]] for i in layout(nd)]
        self.m.add_op("PAD", [self.src(node), self.i32(f"{node.name}_paddings", pairs)], [self.out(node)])

    def _reshape(self, x: int, in_shape, out_shape, name: str) -> int:
        """RESHAPE in PyTorch's (NCHW) element order: 4-D tensors go through TRANSPOSE to NCHW and back (int8 or
        float, the type of ``x``)."""
        t = self.m.tensors[x]
        if len(in_shape) == 4 and not same_bytes(t.shape, inverse(NHWC)):
            x = self._transpose(x, inverse(NHWC), list(in_shape), name)
        back = len(out_shape) == 4 and not same_bytes(list(out_shape), NHWC)
        target = list(out_shape) if back or len(out_shape) != 4 else stored(out_shape)
        flat = self.like(x, f"{name}_reshape", target)
        self.m.add_op("RESHAPE", [x, self.i32(f"{name}_shape", target)], [flat], ("ReshapeOptions", {}))
        if back:
            flat = self._transpose(flat, list(NHWC), stored(out_shape), name)
        return flat

    def _transpose(self, x: int, perm, out_shape, name: str, q: dict | None = None) -> int:
        if list(perm) == list(range(len(perm))):
            return x
        if same_bytes(self.m.tensors[x].shape, perm):  # only size-1 axes move: a RESHAPE
            y = self.like(x, f"{name}_reshape", out_shape)
            self.m.add_op("RESHAPE", [x, self.i32(f"{name}_shape", list(out_shape))], [y], ("ReshapeOptions", {}))
            return y
        y = self.like(x, f"{name}_transpose", out_shape)
        self.m.add_op("TRANSPOSE", [x, self.i32(f"{name}_perm", perm)], [y])
        return y

    def _alias_output(self, node: IntNode, idx: int) -> None:
        """Rename the last tensor to the node's output."""
        self.m.tensors[idx].name = node.outputs[0]
        self.ids[node.outputs[0]] = idx

    def op_Flatten(self, node: IntNode, shape_in) -> None:
        self.op_Reshape(node, shape_in)

    def op_Reshape(self, node: IntNode, shape_in) -> None:
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        self._alias_output(node, self._reshape(self.src(node), in_shape, out_shape, node.name))

    def op_Transpose(self, node: IntNode, shape_in) -> None:
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        perm = then(then(inverse(layout(len(in_shape))), node.attrs["perm"]), layout(len(out_shape)))
        y = self._transpose(self.src(node), perm, stored(out_shape), node.name)
        self._alias_output(node, y)

    def op_Slice(self, node: IntNode, shape_in) -> None:
        in_shape = self.shapes[node.inputs[0]]
        nd = len(in_shape)
        begin, end, step = [0] * nd, list(in_shape), [1] * nd
        at = node.attrs
        for i, (a, st, en) in enumerate(zip(at["axes"], at["starts"], at["ends"])):
            a = a % nd
            begin[a], end[a], step[a] = slice(st, en, (at.get("steps") or [1] * len(at["axes"]))[i]).indices(in_shape[a])
            if step[a] < 1:
                raise EdgeslimError(f"slice {node.name}: negative steps are not exportable to TFLite")
        order = layout(nd)
        args = [self.i32(f"{node.name}_{k}", [v[i] for i in order]) for k, v in
                (("begin", begin), ("end", end), ("strides", step))]
        self.m.add_op("STRIDED_SLICE", [self.src(node), *args], [self.out(node)],
                      ("StridedSliceOptions", {}))

    def op_Resize(self, node: IntNode, shape_in) -> None:
        at = node.attrs
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        nearest = at.get("coordinate_transformation_mode") == "asymmetric" and at.get("nearest_mode") == "floor"
        integer = all(o % i == 0 for i, o in zip(in_shape[2:], out_shape[2:]))
        if not (nearest and integer and len(in_shape) == 4 and at.get("clamp") is None):
            raise EdgeslimError(f"resize {node.name}: only nearest upsampling by integer factors exports to TFLite")
        size = self.i32(f"{node.name}_size", list(out_shape[2:]))
        self.m.add_op("RESIZE_NEAREST_NEIGHBOR", [self.src(node), size], [self.out(node)],
                      ("ResizeNearestNeighborOptions", {"AlignCorners": False, "HalfPixelCenters": False}))

    def op_QLinearRelu(self, node: IntNode, shape_in) -> None:
        q = self.g.qparams[node.outputs[0]]
        off = int8_offset(q)
        lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
        clamp = (max(int(lo), q.qmin) - off, min(int(hi), q.qmax) - off)
        act = next((a for a in ("RELU", "RELU6") if
                    tflite_ops.activation_range(a, q.scale, q.zero_point - off) == clamp), None)
        if act is None:
            raise EdgeslimError(f"ReLU {node.name}: its clamp is not TFLite's RELU / RELU6 range: "
                                "quantize with fusion on (without --no-fuse)")
        self.m.add_op(act, [self.ids[node.inputs[0]]], [self.out(node)])

    def op_LUT(self, node: IntNode, shape_in) -> None:
        fn = node.attrs.get("fn")
        x = self.ids[node.inputs[0]]
        if fn == "leaky_relu":
            self.finish(node, lambda act, y: self.m.add_op("LEAKY_RELU", [x], [y], (
                "LeakyReluOptions", {"Alpha": float(node.attrs["alpha"])})), fusable=False)
            return
        op = node.attrs.get("tflite_op")
        if op == "HARD_SWISH":
            self.finish(node, lambda act, y: self.m.add_op("HARD_SWISH", [x], [y]), fusable=False)
            return
        if op in ("LOGISTIC", "LOGISTIC_MUL"):
            self._logistic(node, x, op)
            return
        qx, qy = self.g.qparams[node.inputs[0]], self.g.qparams[node.outputs[0]]
        lo, hi = node.attrs.get("clamp") or (qy.qmin, qy.qmax)
        # 256 entries indexed by int8 code + 128; codes outside a narrower (< 8-bit) input range never occur
        natural = np.clip(np.arange(-128, 128) + int8_offset(qx), qx.qmin, qx.qmax)
        table = np.asarray(node.arrays["table"], np.int64)[natural - qx.qmin]
        table = np.clip(table, max(lo, qy.qmin), min(hi, qy.qmax)) - int8_offset(qy)
        shape = self.m.tensors[x].shape
        as_i32 = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_codes"), shape, np.int32))
        index = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_index"), shape, np.int32))
        out_t = self.out(node)
        t = self.m.tensors[out_t]
        tab = self.m.const(f"{node.name}_table_{fn}", table.astype(np.int8), scale=t.scale, zero_point=t.zero_point)
        self.m.add_op("CAST", [x], [as_i32])
        self.m.add_op("ADD", [as_i32, self.i32(f"{node.name}_128", [128])], [index], ("AddOptions", {}))  # int8 + 128
        self.m.add_op("GATHER", [tab, index], [out_t], ("GatherOptions", {"Axis": 0}))
        self.lut_tables.append(f"{node.name} ({fn})")


    def _logistic(self, node: IntNode, x: int, op: str) -> None:
        """LOGISTIC (output 1/256, -128, as TFLite requires), then QUANTIZE to the IntGraph's parameters; for a
        gated SiLU to the gate's, then MUL by the input (``x * Q_g(sigmoid(x))``)."""
        shape = self.m.tensors[x].shape
        if op == "LOGISTIC" and same_stored(LOGISTIC_Q, self.g.qparams[node.outputs[0]]):
            self.finish(node, lambda act, y: self.m.add_op("LOGISTIC", [x], [y]), fusable=False)
            return
        sig = self.act(self.fresh(f"{node.name}_logistic"), LOGISTIC_Q, shape)
        self.m.add_op("LOGISTIC", [x], [sig])
        if op == "LOGISTIC":
            self.finish(node, lambda act, y: self.m.add_op("QUANTIZE", [sig], [y]), fusable=False)
            return
        gate = self.requant(sig, LOGISTIC_Q, gate_qparams(node), shape, f"{node.name}_gate")
        self.finish(node, lambda act, y: self.m.add_op("MUL", [x, gate], [y], (
            "MulOptions", {"FusedActivationFunction": act_code(act)})))


def to_tflite(g: IntGraph, *, io: str = "float") -> tuple[bytes, dict]:
    """Serialize a prepared IntGraph (``prepare_graph``) as a ``.tflite`` flatbuffer.

    Returns (bytes, info): info holds ``ops`` (builtin -> count), ``op_codes`` (the TFLM resolver list),
    ``float_ops`` (the float32 builtins in the file, QUANTIZE / DEQUANTIZE aside), ``float_nodes`` (the IntGraph's
    float islands written as them: ``name (op)``), ``lut_as_gather`` (activations
    written as int8 table lookups), ``input_layout`` / ``output_layout``, ``content_sha256``."""
    if io not in IO_TYPES:
        raise EdgeslimError(f"invalid TFLite IO type {io!r}: use one of {', '.join(IO_TYPES)}")
    check_graph(g)
    ex = Exporter(g, io)
    m = ex.run()
    counts: dict[str, int] = {}
    for op in m.ops:
        counts[op.code] = counts.get(op.code, 0) + 1
    float_ops = [op.code for op in m.ops if op.code not in ("QUANTIZE", "DEQUANTIZE") and
                 any(m.tensors[i].dtype == np.float32 for i in [*op.inputs, *op.outputs] if i >= 0)]
    import dataclasses
    import hashlib

    unnamed = dataclasses.replace(m, tensors=[dataclasses.replace(t, name=f"t{i}") for i, t in enumerate(m.tensors)])
    info = {"ops": counts, "op_codes": m.op_codes(), "float_ops": float_ops, "float_nodes": ex.float_nodes,
            "lut_as_gather": ex.lut_tables,
            # the file with its tensor names left out: equal for the same model read back from model_int8.onnx
            "content_sha256": hashlib.sha256(to_bytes(unnamed)).hexdigest(),
            "io": io, "input_layout": "NHWC" if len(g.input_shape) == 3 else "as IntGraph",
            "output_layout": ["NHWC" if len(s) == 3 else "as IntGraph" for s in g.output_shapes]}
    return to_bytes(m), info


def export_tflite(q, path: str | Path, *, calib: np.ndarray | None = None, io: str = "float",
                  activations: str = "builtin") -> dict:
    """Write the LiteRT int8 model of ``q`` (an ``edgeslim.Quantized`` or an ``IntGraph``) to ``path`` atomically.

    ``calib`` (float N, C, H, W inputs) sets the range of int8 logits (``prepare_graph``); ``io``: ``float``
    (QUANTIZE / DEQUANTIZE inside the file) or ``int8``; ``activations``: ``builtin`` or ``table``. Returns
    ``to_tflite``'s info plus ``graph``: the prepared IntGraph, which ``engine.run(graph, x, requant="tflite")``
    computes bit for bit as TFLM does (and LiteRT's reference kernels, to 1 LSB after FULLY_CONNECTED).

    >>> info = export_tflite(q, "model_int8.tflite", calib=x[:256])  # doctest: +SKIP
    """
    g = getattr(q, "intgraph", q)
    tg = prepare_graph(g, calib, activations=activations)
    fb, info = to_tflite(tg, io=io)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(fb)
    tmp.replace(path)
    return {**info, "size_bytes": len(fb), "graph": tg}
