"""QDQ ONNX -> ``IntGraph``: run an INT8 ONNX model made elsewhere with the numpy integer engine.

    g = import_qdq("model_int8.onnx")   # or an onnx.ModelProto
    outputs = engine.run.run(g, x)

Pattern matching over a QDQ graph (numpy + onnx only):

* ``QuantizeLinear`` of the float graph input -> ``QuantizeLinear``; ``DequantizeLinear`` to a graph
  output -> ``DequantizeLinear``;
* ``DQ(x), DQ(w const), [DQ(bias int32) | float bias] -> Conv -> [Relu | Clip] -> Q`` -> ``QLinearConv``;
  ``Gemm`` / ``MatMul [+ Add bias]`` likewise -> ``QGemm`` (no Q after it at a graph output:
  ``float_output``); ``Add``, ``Concat``, ``GlobalAveragePool`` / ``ReduceMean(H, W)``, ``AveragePool``,
  ``Relu`` between DQ and Q -> the ``QLinear*`` node; a Relu / Clip before the Q is an output clamp;
* scale-preserving ops (MaxPool, Slice, Pad, Flatten, Reshape to N x K, Identity, Gather with constant indices)
  either on the codes
  (edgeslim's writer) or on a dequantized tensor (onnxruntime's ``DQ -> op -> Q`` with equal qparams):
  ``op(DQ(x)) == DQ(op(x))``, so both become the pass-through IntNode;
* ``Q -> DQ`` pairs are just the tensor's ``QParams``; an integer ``Clip`` between them is an output clamp;
* any other op (an activation onnxruntime runs as its own table kernel, PReLU, bilinear Resize, box-decoding
  arithmetic, a shape computation for a dynamic-batch Reshape) becomes a ``FloatIsland``: the node itself as a
  one-node ONNX model, fed with the dequantized activations, other islands' results, constants and the
  dequantized values of quantized constants; a QuantizeLinear of its result starts integer codes again.

Activation codes are "natural": a uint8 tensor with zero point z is ``QParams(signed=False, bits=8)``,
int8 is signed. What cannot be read even as a float island raises ``EdgeslimError`` naming the op and the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import EdgeslimError
from ..intgraph import IntGraph, IntNode, QParams
from ..quant.fixed_point import multiplier_arrays

__all__ = ["import_qdq"]


_INT_TYPES = {np.dtype(np.uint8): (8, False), np.dtype(np.int8): (8, True),
              np.dtype(np.uint16): (16, False), np.dtype(np.int16): (16, True)}
_PASS_OPS = ("MaxPool", "Slice", "Pad", "Flatten", "Reshape", "Identity", "Gather")


@dataclass
class _Weight:  # DQ of a constant integer tensor
    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray
    axis: int
    bits: int


@dataclass
class _Pending:  # a float op whose result is waiting for its QuantizeLinear
    op: str
    inputs: list[str]  # integer tensor names
    node: onnx.NodeProto
    attrs: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    weight: _Weight | None = None
    bias: np.ndarray | None = None  # int values
    float_bias: np.ndarray | None = None
    clip: tuple[float, float] | None = None  # float clamp (Relu / Clip) before the Q


def _unsupported(node: onnx.NodeProto, why: str) -> EdgeslimError:
    name = node.name or (node.output[0] if node.output else "?")
    return EdgeslimError(f"ONNX op '{node.op_type}' (node '{name}') is not supported by the integer importer: {why}")


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


class _Importer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        gr = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in gr.initializer}
        self.shapes: dict[str, tuple] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                dims = vi.type.tensor_type.shape.dim
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        except Exception:  # noqa: BLE001, S110 - shapes are a convenience; declared ones come first
            pass
        self.consumers: dict[str, int] = {}
        for n in gr.node:
            for i in n.input:
                if i:
                    self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in gr.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1
        inputs = [i for i in gr.input if i.name not in self.consts]
        if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise EdgeslimError("the integer importer needs an ONNX model with exactly one float input")
        dims = inputs[0].type.tensor_type.shape.dim[1:]
        in_shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        self.g = IntGraph(input_name=inputs[0].name, input_shape=in_shape, output_names=[])
        self.float_inputs = {inputs[0].name}
        self.floats: set[str] = set()  # float tensors computed by float islands
        self.float_types: dict[str, int] = {}
        self.islands = 0
        self.alias: dict[str, str] = {}  # ONNX integer tensor -> IntGraph tensor
        self.views: dict[str, str] = {}  # float tensor == DQ(IntGraph tensor)
        self.weights: dict[str, _Weight] = {}
        self.pending: dict[str, _Pending] = {}
        self.producer: dict[str, IntNode] = {}

    # ------------------------------------------------------------------ helpers
    def const(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        if name not in self.consts:
            raise _unsupported(node, f"its {what} ({name}) must be a constant")
        return self.consts[name]

    def int_name(self, name: str) -> str | None:
        name = self.alias.get(name, name)
        return name if name in self.g.qparams else None

    def add(self, node: IntNode) -> None:
        self.g.nodes.append(node)
        for o in node.outputs:
            self.producer[o] = node

    def qparams_of(self, node: onnx.NodeProto) -> QParams:
        scale = self.const(node.input[1], node, "scale")
        if len(node.input) > 2 and node.input[2]:
            zp = self.const(node.input[2], node, "zero point")
        else:
            zp = np.zeros((), dtype=np.uint8)
        if scale.size != 1 or zp.size != 1:
            raise _unsupported(node, "per-axis quantization of an activation")
        if zp.dtype not in _INT_TYPES:
            raise _unsupported(node, f"activation type {zp.dtype}")
        bits, signed = _INT_TYPES[zp.dtype]
        return QParams(float(np.float32(scale.reshape(()))), int(zp.reshape(())), bits, signed)

    # ------------------------------------------------------------------ main walk
    def run(self) -> IntGraph:
        for node in self.model.graph.node:
            handler = getattr(self, f"_op_{node.op_type}", None)
            if node.domain not in ("", "ai.onnx"):
                raise _unsupported(node, "no integer kernel for it (custom domain)")
            if any(i in self.floats for i in node.input) and node.op_type != "QuantizeLinear":
                handler = None  # an op reading an island's float result is float as well
            if handler is None:
                self._island(node, "no integer kernel for it")
                continue
            try:
                handler(node)
            except EdgeslimError as exc:
                if any(o in self.pending or o in self.views or o in self.alias or o in self.g.qparams
                       for o in node.output):
                    raise
                self._island(node, str(exc))
        self._outputs()
        return self.g

    def _island(self, node: onnx.NodeProto, why: str) -> None:
        """A float op (what onnxruntime runs between DQ and Q, or a shape computation) as a ``FloatIsland``:
        its inputs are dequantized activations, other islands' results, the graph input or constants."""
        from onnx import helper

        inputs, feeds, inits = [], [], []
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in self.consts:
                inits.append(numpy_helper.from_array(self.consts[name], name))
                continue
            if name in self.weights:  # DQ of a quantized constant operand: its float value, as DQ computes it
                w = self.weights[name]
                shape = [1] * w.q.ndim
                if w.scale.size > 1:
                    shape[w.axis] = -1
                value = ((w.q.astype(np.float32) - w.zp.reshape(shape).astype(np.float32))
                         * w.scale.reshape(shape).astype(np.float32)).astype(np.float32)
                inits.append(numpy_helper.from_array(value, name))
                continue
            if name in self.views:
                src, dtype = self.views[name], onnx.TensorProto.FLOAT
            elif name in self.floats or name in self.float_inputs:
                src, dtype = name, self.float_types.get(name, onnx.TensorProto.FLOAT)
            else:
                raise _unsupported(node, f"{why}; and its input {name} is neither a dequantized activation nor a "
                                   "float tensor")
            inputs.append(src)
            feeds.append(helper.make_tensor_value_info(name, dtype, None))
        outs = [o for o in node.output if o]
        graph = helper.make_graph([node], "island", feeds, [helper.make_tensor_value_info(o, 0, None) for o in outs],
                                  initializer=inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        try:
            from onnx.reference import ReferenceEvaluator

            ReferenceEvaluator(model)  # rejects ops the reference implementation (the engine's float path) lacks
        except Exception as exc:  # noqa: BLE001
            raise _unsupported(node, f"{why}; and it cannot run as a float island ({str(exc).splitlines()[0][:80]})")
        for o in outs:
            self.floats.add(o)
            self.float_types[o] = self._infer_type(model, o)
        self.islands += 1
        self.add(IntNode("FloatIsland", outs[0], inputs, outs, {"fn": node.op_type},
                         {"onnx": np.frombuffer(model.SerializeToString(), np.uint8)}))

    def _infer_type(self, model: onnx.ModelProto, name: str) -> int:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for vi in inferred.graph.output:
                if vi.name == name and vi.type.tensor_type.elem_type:
                    return vi.type.tensor_type.elem_type
        except Exception:  # noqa: BLE001, S110 - float unless inference says otherwise
            pass
        return onnx.TensorProto.FLOAT

    def _outputs(self) -> None:
        for out in self.model.graph.output:
            name = out.name
            if name in self.floats:
                pass  # computed by a float island under its own name
            elif name in self.views:
                self.add(IntNode("DequantizeLinear", name, [self.views[name]], [name]))
            elif name in self.pending and self.pending[name].op == "QGemm" and self.pending[name].clip is None:
                p = self.pending.pop(name)
                self._emit_weighted(p, name, None)
            elif self.int_name(name) is not None:
                src = self.int_name(name)
                if src != name:
                    self.g.qparams[name] = self.g.qparams[src]
                    self.add(IntNode("Identity", name, [src], [name]))
            else:
                raise EdgeslimError(f"graph output '{name}' is a float tensor the integer importer cannot compute "
                                    "(not a DequantizeLinear or float-output Gemm)")
            self.g.output_names.append(name)
            dims = out.type.tensor_type.shape.dim[1:]
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            if not dims or -1 in shape:
                shape = self.shapes.get(name, (-1, *shape))[1:]
            self.g.output_shapes.append(tuple(shape))
        for name, p in self.pending.items():
            raise _unsupported(p.node, "its float result is not quantized by a QuantizeLinear")

    # ------------------------------------------------------------------ Q / DQ / Clip
    def _op_Constant(self, node):
        if len(node.attribute) != 1:
            raise _unsupported(node, f"Constant with {len(node.attribute)} attributes (one is required)")
        a = node.attribute[0]
        if a.name != "value":
            raise _unsupported(node, f"Constant with attribute {a.name}")
        self.consts[node.output[0]] = numpy_helper.to_array(a.t)

    def _op_QuantizeLinear(self, node):
        if node.input[0] in self.consts:  # a quantized constant (a Constant node's value): fold it
            self.consts[node.output[0]] = self._fold_quantize(node)
            return
        q = self.qparams_of(node)
        src, out = node.input[0], node.output[0]
        if src in self.float_inputs or src in self.floats:
            self.g.qparams[out] = q
            self.add(IntNode("QuantizeLinear", out, [src], [out]))
        elif src in self.views:
            view = self.views[src]
            qv = self.g.qparams[view]
            if (np.float32(qv.scale), qv.zero_point, qv.bits, qv.signed) != (np.float32(q.scale), q.zero_point,
                                                                             q.bits, q.signed):
                raise _unsupported(node, "requantizing a dequantized tensor to other qparams without an op between")
            self.alias[out] = view
        elif src in self.pending:
            p = self.pending.pop(src)
            if self.consumers.get(src, 0) != 1:
                raise _unsupported(p.node, "its float result has consumers besides the QuantizeLinear")
            self.g.qparams[out] = q
            self._emit(p, out, q)
        else:
            raise _unsupported(node, f"its input {src} is neither the graph input nor a quantized op's result")

    def _fold_quantize(self, node) -> np.ndarray:
        x = self.consts[node.input[0]].astype(np.float32)
        scale = self.const(node.input[1], node, "scale").astype(np.float32)
        zp = self.const(node.input[2], node, "zero point") if len(node.input) > 2 and node.input[2] \
            else np.zeros(scale.shape, np.uint8)
        shape = [1] * x.ndim
        if scale.size > 1:
            shape[_attrs(node).get("axis", 1)] = -1
        info = np.iinfo(zp.dtype)
        codes = np.rint(x / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape)
        return np.clip(codes, info.min, info.max).astype(zp.dtype)

    def _op_DequantizeLinear(self, node):
        src, out = node.input[0], node.output[0]
        if src in self.consts:
            q = self.consts[src]
            if q.dtype not in (*_INT_TYPES, np.dtype(np.int32)):
                raise _unsupported(node, f"constant of type {q.dtype}")
            scale = self.const(node.input[1], node, "scale").astype(np.float32)
            zp = (self.const(node.input[2], node, "zero point") if len(node.input) > 2 and node.input[2]
                  else np.zeros_like(scale, dtype=q.dtype))
            axis = _attrs(node).get("axis", 1)
            bits = 32 if q.dtype == np.int32 else _INT_TYPES[q.dtype][0]
            self.weights[out] = _Weight(q, scale.reshape(-1), zp.astype(np.int64).reshape(-1), axis, bits)
            return
        name = self.int_name(src)
        if name is None:
            raise _unsupported(node, f"its input {src} is not a quantized tensor")
        q = self.qparams_of(node)
        qi = self.g.qparams[name]
        if (np.float32(q.scale), q.zero_point) != (np.float32(qi.scale), qi.zero_point):
            raise _unsupported(node, f"its scale / zero point differ from those of the codes of {src}")
        self.views[out] = name

    def _op_Clip(self, node):
        src = node.input[0]
        bounds = [self.const(i, node, "bound") if i else None for i in list(node.input[1:3]) + [""] * 2][:2]
        if src in self.pending:  # float clip before the Q: an output clamp
            lo = -np.inf if bounds[0] is None else float(bounds[0])
            hi = np.inf if bounds[1] is None else float(bounds[1])
            self._clip_pending(node, src, lo, hi)
            return
        name = self.int_name(src)
        if name is None:
            raise _unsupported(node, "Clip of a float tensor outside a quantized op")
        prod = self.producer.get(name)
        if prod is None or prod.op in _PASS_OPS or self.consumers.get(src, 0) != 1 or prod.outputs[0] != name:
            raise _unsupported(node, "an integer Clip must follow the only use of a requantizing op's output")
        q = self.g.qparams[name]
        lo, hi = prod.attrs.get("clamp") or (q.qmin, q.qmax)
        if bounds[0] is not None:
            lo = max(lo, int(bounds[0]))
        if bounds[1] is not None:
            hi = min(hi, int(bounds[1]))
        prod.attrs["clamp"] = (int(lo), int(hi))
        self.alias[node.output[0]] = name

    def _clip_pending(self, node, src, lo: float, hi: float) -> None:
        p = self.pending.pop(src)
        if self.consumers.get(src, 0) != 1:
            raise _unsupported(node, "the clamped float result has other consumers")
        if p.clip is not None:
            lo, hi = max(lo, p.clip[0]), min(hi, p.clip[1])
        p.clip = (lo, hi)
        self.pending[node.output[0]] = p

    # ------------------------------------------------------------------ float ops between DQ and Q
    def _view_inputs(self, node, names) -> list[str]:
        out = []
        for n in names:
            if n not in self.views:
                raise _unsupported(node, f"its input {n} is not a dequantized activation (DQ of a quantized tensor)")
            out.append(self.views[n])
        return out

    def _op_Relu(self, node):
        src = node.input[0]
        if src in self.pending:
            self._clip_pending(node, src, 0.0, np.inf)
        else:
            self.pending[node.output[0]] = _Pending("QLinearRelu", self._view_inputs(node, [src]), node)

    def _op_Conv(self, node):
        a = _attrs(node)
        if a.get("auto_pad", "NOTSET") != "NOTSET":
            raise _unsupported(node, f"auto_pad={a['auto_pad']}: export with explicit pads")
        w = self._weight(node, node.input[1], axis=0)
        if w.q.ndim != 4:
            raise _unsupported(node, "only 2-D convolutions are supported")
        attrs = {"strides": list(a.get("strides", [1, 1])), "pads": list(a.get("pads", [0, 0, 0, 0])),
                 "dilations": list(a.get("dilations", [1, 1])), "group": int(a.get("group", 1))}
        p = _Pending("QLinearConv", self._view_inputs(node, node.input[:1]), node, attrs, weight=w)
        if len(node.input) > 2 and node.input[2]:
            self._bias(p, node.input[2])
        self.pending[node.output[0]] = p

    def _op_Gemm(self, node):
        a = _attrs(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise _unsupported(node, "only transA=0, alpha=beta=1 is supported")
        trans_b = bool(a.get("transB", 0))
        w = self._weight(node, node.input[1], axis=0 if trans_b else 1, transpose=not trans_b)
        p = _Pending("QGemm", self._view_inputs(node, node.input[:1]), node, weight=w)
        if len(node.input) > 2 and node.input[2]:
            self._bias(p, node.input[2])
        self.pending[node.output[0]] = p

    def _op_MatMul(self, node):
        w = self._weight(node, node.input[1], axis=1, transpose=True)
        if w.q.ndim != 2:
            raise _unsupported(node, "only a 2-D constant right-hand side is supported")
        self.pending[node.output[0]] = _Pending("QGemm", self._view_inputs(node, node.input[:1]), node, weight=w)

    def _weight(self, node, name: str, axis: int, transpose: bool = False) -> _Weight:
        if name not in self.weights or self.weights[name].bits > 16:
            raise _unsupported(node, f"its weight {name} is not a DequantizeLinear of a constant int8/uint8 tensor")
        w = self.weights[name]
        if w.scale.size > 1 and (w.axis % w.q.ndim) != axis:
            raise _unsupported(node, f"per-channel weight quantization along axis {w.axis} (needs output channels)")
        q = (w.q.T if transpose else w.q).astype(np.int32)
        zp = np.asarray(w.zp).astype(np.int32)
        if w.q.dtype == np.uint8:
            # a uint8 weight container (u8u8: what edgeslim writes on AVX2 CPUs without VNNI, or a uint8 quantizer)
            # holds the same real values as int8 codes q - 128 with zero point z - 128: read it as those, so a
            # symmetric int8 weight stored as uint8 (z = 128) is symmetric again
            q, zp = q - 128, zp - 128
        return _Weight(np.ascontiguousarray(q), w.scale, zp, 0, w.bits)

    def _bias(self, p: _Pending, name: str) -> None:
        if name in self.weights and self.weights[name].bits == 32:
            p.bias = self.weights[name].q.astype(np.int64).reshape(-1)
        elif name in self.consts and self.consts[name].dtype.kind == "f":
            p.float_bias = self.consts[name].astype(np.float32).reshape(-1)
        else:
            raise _unsupported(p.node, f"its bias {name} is neither DequantizeLinear(int32 constant) nor a float constant")

    def _op_Add(self, node):
        a, b = node.input[0], node.input[1]
        for x, c in ((a, b), (b, a)):  # MatMul + bias
            if x in self.pending and self.pending[x].op == "QGemm" and self.pending[x].bias is None \
                    and self.pending[x].float_bias is None and self.pending[x].clip is None \
                    and (c in self.consts or c in self.weights):
                p = self.pending.pop(x)
                self._bias(p, c)
                self.pending[node.output[0]] = p
                return
        self.pending[node.output[0]] = _Pending("QLinearAdd", self._view_inputs(node, [a, b]), node)

    def _op_Mul(self, node):
        self.pending[node.output[0]] = _Pending("QLinearMul", self._view_inputs(node, list(node.input[:2])), node)

    def _op_Concat(self, node):
        axis = int(_attrs(node).get("axis", 1))
        self.pending[node.output[0]] = _Pending("QLinearConcat", self._view_inputs(node, list(node.input)), node,
                                                {"axis": axis})

    def _op_GlobalAveragePool(self, node):
        self.pending[node.output[0]] = _Pending("QLinearGlobalAveragePool",
                                                self._view_inputs(node, node.input[:1]), node, {"keepdims": True})

    def _op_ReduceMean(self, node):
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1], node, "axes").tolist()
        if sorted(int(x) % 4 for x in (axes or [])) != [2, 3]:
            raise _unsupported(node, "only the mean over H and W of an N,C,H,W tensor is supported")
        self.pending[node.output[0]] = _Pending("QLinearGlobalAveragePool", self._view_inputs(node, node.input[:1]),
                                                node, {"keepdims": bool(a.get("keepdims", 1))})

    def _op_AveragePool(self, node):
        a = _attrs(node)
        if any(a.get("pads", [0])) or a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") != "NOTSET":
            raise _unsupported(node, "only unpadded average pooling (ceil_mode=0) is supported")
        k = list(a["kernel_shape"])
        self.pending[node.output[0]] = _Pending("QLinearAveragePool", self._view_inputs(node, node.input[:1]), node,
                                                {"kernel_shape": k, "strides": list(a.get("strides", [1, 1]))})

    # ------------------------------------------------------------------ scale-preserving ops
    def _pass_attrs(self, node) -> tuple[str, dict]:
        op, a = node.op_type, _attrs(node)
        if op == "MaxPool":
            if len(node.output) > 1 and node.output[1]:
                raise _unsupported(node, "the Indices output")
            if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1])) \
                    or a.get("auto_pad", "NOTSET") != "NOTSET" or len(a["kernel_shape"]) != 2:
                raise _unsupported(node, "only 2-D max pooling without dilation / ceil_mode / auto_pad")
            return op, {"kernel_shape": list(a["kernel_shape"]), "strides": list(a.get("strides", [1, 1])),
                        "pads": list(a.get("pads", [0, 0, 0, 0]))}
        if op == "Slice":
            ins = [self.const(i, node, "slice parameter").astype(np.int64).tolist() if i else None
                   for i in list(node.input[1:5]) + [""] * 3][:4]
            starts, ends, axes, steps = ins
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
            return op, {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
        if op == "Pad":
            if a.get("mode", "constant") != "constant" or (len(node.input) > 3 and node.input[3]):
                raise _unsupported(node, "only constant padding without axes")
            pads = self.const(node.input[1], node, "pads").astype(np.int64).tolist()
            value = self.const(node.input[2], node, "value") if len(node.input) > 2 and node.input[2] else None
            return op, {"pads": pads, "_value": value}
        if op == "Flatten":
            return op, {"axis": int(a.get("axis", 1))}
        if op == "Reshape":
            shape = self.const(node.input[1], node, "shape").astype(np.int64).tolist()
            in_shape = self.shapes.get(node.input[0])
            ok = len(shape) == 2 and (shape[0] in (0, -1) or shape[1] == -1)
            if ok and in_shape and -1 not in in_shape[1:] and shape[1] not in (-1, int(np.prod(in_shape[1:]))):
                ok = False
            if not ok:
                raise _unsupported(node, f"only a reshape to (N, -1) is supported, not {shape}")
            return "Flatten", {"axis": 1}
        if op == "Resize":
            return op, self._resize_attrs(node)
        if op == "Gather":  # constant indices (a channel repeat or selection): it only moves codes
            index = self.const(node.input[1], node, "indices").astype(np.int64)
            return op, {"axis": int(a.get("axis", 0)), "index": int(index) if index.ndim == 0 else index.tolist()}
        return "Identity", {}

    def _pass_node(self, node, src: str, on_codes: bool) -> None:
        op, attrs = self._pass_attrs(node)
        q = self.g.qparams[src]
        value = attrs.pop("_value", None)
        if op == "Pad" and value is not None:
            v = float(np.asarray(value).reshape(()))
            if (on_codes and v != q.zero_point) or (not on_codes and v != 0.0):
                raise _unsupported(node, "only zero padding (the zero point on the codes) is supported")
        out = node.output[0]
        self.g.qparams[out] = q
        self.add(IntNode(op, out, [src], [out], attrs))
        if not on_codes:
            self.views[out] = out

    def _passthrough(self, node):
        src = node.input[0]
        name = self.int_name(src)
        if name is not None:
            self._pass_node(node, name, on_codes=True)
        elif src in self.views:
            if node.op_type == "Identity":
                self.views[node.output[0]] = self.views[src]
                return
            self._pass_node(node, self.views[src], on_codes=False)
        else:
            raise _unsupported(node, f"its input {src} is a float tensor outside a quantized op")

    _op_MaxPool = _op_Slice = _op_Pad = _op_Flatten = _op_Reshape = _op_Identity = _op_Gather = _passthrough
    _op_Resize = _passthrough  # nearest only (checked in _resize_attrs): op(DQ(x)) == DQ(op(x))

    def _resize_attrs(self, node) -> dict:
        a = _attrs(node)
        if a.get("mode", "nearest") != "nearest":
            raise _unsupported(node, f"mode={a['mode']}: only nearest resizing keeps the codes")
        coord = a.get("coordinate_transformation_mode", "half_pixel")
        nearest = a.get("nearest_mode", "round_prefer_floor")
        if coord not in ("half_pixel", "asymmetric", "pytorch_half_pixel", "align_corners"):
            raise _unsupported(node, f"coordinate_transformation_mode={coord}")
        if nearest not in ("round_prefer_floor", "floor", "ceil"):
            raise _unsupported(node, f"nearest_mode={nearest}")
        if a.get("axes") is not None or a.get("keep_aspect_ratio_policy", "stretch") != "stretch" \
                or a.get("antialias", 0) or a.get("exclude_outside", 0):
            raise _unsupported(node, "axes / keep_aspect_ratio_policy / antialias / exclude_outside")
        ins = list(node.input) + [""] * 4
        attrs = {"coordinate_transformation_mode": coord, "nearest_mode": nearest}
        scales = self.const(ins[2], node, "scales") if ins[2] else None
        if ins[3]:
            attrs["sizes"] = self.const(ins[3], node, "sizes").astype(np.int64).tolist()
        elif scales is not None and scales.size:
            sc = scales.astype(np.float32).tolist()
            if sc[0] != 1.0:
                raise _unsupported(node, "resizing the batch axis")
            attrs["scales"] = sc
        else:
            raise _unsupported(node, "needs constant scales or sizes")
        return attrs

    def _op_ConvTranspose(self, node):
        a = _attrs(node)
        if a.get("auto_pad", "NOTSET") != "NOTSET" or a.get("output_shape") is not None:
            raise _unsupported(node, "auto_pad / output_shape: export with explicit pads and output_padding")
        w = self._weight(node, node.input[1], axis=1)
        if w.q.ndim != 4:
            raise _unsupported(node, "only 2-D transposed convolutions are supported")
        attrs = {"strides": list(a.get("strides", [1, 1])), "pads": list(a.get("pads", [0, 0, 0, 0])),
                 "dilations": list(a.get("dilations", [1, 1])), "group": int(a.get("group", 1)),
                 "output_padding": list(a.get("output_padding", [0, 0]))}
        p = _Pending("QLinearConvTranspose", self._view_inputs(node, node.input[:1]), node, attrs, weight=w)
        if len(node.input) > 2 and node.input[2]:
            self._bias(p, node.input[2])
        self.pending[node.output[0]] = p

    # ------------------------------------------------------------------ emission
    def _emit(self, p: _Pending, out: str, q: QParams) -> None:
        clamp = (q.qmin, q.qmax)
        if p.clip is not None:
            lo, hi = p.clip
            qlo = q.qmin if lo == -np.inf else int(np.rint(np.float32(lo) / np.float32(q.scale))) + q.zero_point
            qhi = q.qmax if hi == np.inf else int(np.rint(np.float32(hi) / np.float32(q.scale))) + q.zero_point
            clamp = (max(q.qmin, qlo), min(q.qmax, qhi))
        if p.op in ("QLinearConv", "QGemm", "QLinearConvTranspose"):
            self._emit_weighted(p, out, q, clamp)
        else:
            attrs = dict(p.attrs)
            attrs["clamp"] = clamp
            self.add(IntNode(p.op, out, list(p.inputs), [out], attrs))

    def _emit_weighted(self, p: _Pending, out: str, q: QParams | None, clamp=None) -> None:
        w = p.weight
        in_q = self.g.qparams[p.inputs[0]]
        # ConvTranspose weights are (C_in, C_out / group, kH, kW): output channels on axis 1
        n_out = w.q.shape[1] * int(p.attrs["group"]) if p.op == "QLinearConvTranspose" else w.q.shape[0]
        if w.scale.size not in (1, n_out):
            raise _unsupported(p.node, "weight scale length does not match the output channels")
        arrays = {"w": w.q, "w_scale": w.scale.astype(np.float32), "w_zero_point": w.zp.astype(np.int32)}
        if p.float_bias is not None:
            bscale = (np.float32(in_q.scale) * w.scale.astype(np.float32)).astype(np.float64)
            arrays["bias"] = np.rint(p.float_bias.astype(np.float64) / bscale).astype(np.int64)
        elif p.bias is not None:
            arrays["bias"] = p.bias
        if "bias" in arrays and arrays["bias"].size not in (1, n_out):
            raise _unsupported(p.node, "bias length does not match the output channels")
        attrs = {"w_bits": w.bits, "per_channel": w.scale.size > 1, "module": p.node.name or out}
        if q is not None:
            multiplier = in_q.scale * w.scale.astype(np.float64) / q.scale
            if p.op == "QLinearConvTranspose":
                multiplier = np.broadcast_to(multiplier, (n_out,)).copy()
            arrays.update(multiplier_arrays(multiplier))
            attrs["clamp"] = clamp
        else:
            attrs["float_output"] = True
        attrs.update(p.attrs)
        self.add(IntNode(p.op, out, [p.inputs[0]], [out], attrs, arrays))


def import_qdq(path_or_model: str | Path | onnx.ModelProto) -> IntGraph:
    """Read a QDQ ONNX model (edgeslim's, onnxruntime's ``quantize_static``, ...) as an ``IntGraph``."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        try:
            model = onnx.load(str(path_or_model))
        except Exception as exc:  # noqa: BLE001
            raise EdgeslimError(f"cannot read ONNX model '{path_or_model}' ({str(exc).splitlines()[0][:120]}): "
                                "pass an .onnx file") from None
    try:
        return _Importer(model).run()
    except (EdgeslimError, MemoryError):
        raise
    except RecursionError:
        raise EdgeslimError(f"ONNX model '{path_or_model if not isinstance(path_or_model, onnx.ModelProto) else '<model>'}'"
                            " is nested too deeply to import: check the file") from None
    except Exception as exc:  # a malformed graph the checks did not foresee: one line, never a raw traceback
        shown = "<model>" if isinstance(path_or_model, onnx.ModelProto) else path_or_model
        raise EdgeslimError(f"ONNX model '{shown}' cannot be imported as a QDQ model ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}): check the file with onnx.checker") from None
