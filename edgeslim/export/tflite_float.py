"""The float islands of the TFLite writer (``export.tflite``): IntGraph ops that edgeslim keeps in float
(between DequantizeLinear / QuantizeLinear) written as TFLite's float32 builtins, DEQUANTIZE in front, QUANTIZE
after. ``FloatIslands`` is the part of the writer that emits them; the engine computes them in numpy float32
(``engine.float_ops``)."""

from __future__ import annotations

import numpy as np

from ..engine.tflite_run import gate_qparams
from ..errors import EdgeslimError
from ..intgraph import IntNode
from .tflite_fb import Tensor
from .tflite_layout import act_code, inverse, layout, stored, then

__all__ = ["FloatIslands"]


class FloatIslands:
    """The float-island ``op_*`` writers of ``tflite.Exporter`` (a mixin: it uses the writer's tensors, ``fin``,
    ``out``, ``fconst`` and its shape helpers)."""

    # float islands ---------------------------------------------------------
    # IntGraph ops that edgeslim keeps in float (between DequantizeLinear / QuantizeLinear) are written as TFLite's
    # float32 builtins: DEQUANTIZE in front (``fin``), QUANTIZE after (the IntGraph's QuantizeLinear). They are
    # listed in ``float_nodes``; the engine computes them in numpy float32 (``engine.float_ops``).

    def float_op(self, node: IntNode, what: str | None = None) -> None:
        self.float_nodes.append(f"{node.name} ({what or node.attrs.get('fn', node.op)})")

    def _f_elementwise(self, node: IntNode, code: str, xs: list[int], options=None) -> None:
        self.m.add_op(code, xs, [self.out(node)], options)

    def _f_binary(self, node: IntNode, code: str, a: int, b: int) -> None:
        shape = self.shapes[node.outputs[0]]
        for t in (a, b):
            if len(self.m.tensors[t].shape) != len(shape) and self.m.tensors[t].data is None:
                raise EdgeslimError(f"{node.op} {node.name}: float inputs of different rank are not exportable to "
                                    "TFLite yet")
        opts = {"ADD": ("AddOptions", {}), "SUB": ("SubOptions", {}), "MUL": ("MulOptions", {}),
                "DIV": ("DivOptions", {})}.get(code)
        self._f_elementwise(node, code, [a, b], opts)

    def op_Add(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_binary(node, "ADD", self.fin(node.inputs[0]), self.fin(node.inputs[1]))

    def op_Mul(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_binary(node, "MUL", self.fin(node.inputs[0]), self.fin(node.inputs[1]))

    def op_Concat(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        nd = len(self.shapes[node.outputs[0]])
        axis = layout(nd).index(node.attrs["axis"] % nd)
        self._f_elementwise(node, "CONCATENATION", [self.fin(n) for n in node.inputs],
                            ("ConcatenationOptions", {"Axis": axis, "FusedActivationFunction": 0}))

    def _f_clip(self, node: IntNode, x: int, lo: float, hi: float) -> None:
        builtin = {(0.0, 6.0): "RELU6", (0.0, np.inf): "RELU"}  # (TFLM has no RELU_0_TO_1 / RELU_N1_TO_1)
        code = builtin.get((float(lo), float(hi)))
        if code is not None:
            self._f_elementwise(node, code, [x])
            return
        shape = self.m.tensors[x].shape
        for op, bound in (("MAXIMUM", lo), ("MINIMUM", hi)):
            if not np.isfinite(bound):
                continue
            y = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_{op.lower()}"), shape, np.float32))
            self.m.add_op(op, [x, self.m.const(self.fresh(f"{node.name}_bound"), np.array([bound], np.float32))], [y])
            x = y
        self._alias_output(node, x)

    def op_Relu(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_elementwise(node, "RELU", [self.fin(node.inputs[0])])

    def op_Clip(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_clip(node, self.fin(node.inputs[0]), node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf))

    def _f_mean(self, node: IntNode, x: int, axes, keepdims: bool, code: str = "MEAN") -> None:
        in_shape = self.shapes[node.inputs[0]]
        nd = len(in_shape)
        lay = layout(nd)
        axes = sorted(a % nd for a in axes)
        kept = [a for a in lay if a not in axes]
        if not keepdims and nd == 4 and kept != sorted(kept):  # the remaining axes would be out of order
            x, lay = self.logical(x, in_shape, node.name), tuple(range(nd))
        stored_axes = self.i32(f"{node.name}_axes", [lay.index(a) for a in axes])
        self._f_elementwise(node, code, [x, stored_axes], ("ReducerOptions", {"KeepDims": bool(keepdims)}))

    def op_GlobalAveragePool(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_mean(node, self.fin(node.inputs[0]), [2, 3], True)

    def op_ReduceMean(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_mean(node, self.fin(node.inputs[0]), node.attrs["axes"], bool(node.attrs.get("keepdims", 1)))

    def op_AveragePool(self, node: IntNode, shape_in) -> None:
        """Float AVERAGE_POOL_2D; ONNX pads with count_include_pad are an explicit zero PAD, then VALID."""
        self.float_op(node)
        k, s = node.attrs["kernel_shape"], node.attrs["strides"]
        x = self.fin(node.inputs[0])
        pads = list(node.attrs.get("pads") or (0, 0, 0, 0))
        if any(pads):
            in_shape = self.shapes[node.inputs[0]]
            padded = [1, in_shape[2] + pads[0] + pads[2], in_shape[3] + pads[1] + pads[3], in_shape[1]]
            y = self.like(x, f"{node.name}_pad", padded)
            self.m.add_op("PAD", [x, self.i32(f"{node.name}_paddings",
                                              [[0, 0], [pads[0], pads[2]], [pads[1], pads[3]], [0, 0]])], [y])
            x = y
        self._f_elementwise(node, "AVERAGE_POOL_2D", [x], ("Pool2DOptions", {
            "Padding": 1, "StrideW": s[1], "StrideH": s[0], "FilterWidth": k[1], "FilterHeight": k[0]}))

    def _f_activation(self, node: IntNode, fn: str, x: int, attrs: dict, onnx_defaults: bool = False) -> None:
        if fn == "Sigmoid":
            self._f_elementwise(node, "LOGISTIC", [x])
        elif fn == "Tanh":
            self._f_elementwise(node, "TANH", [x])
        elif fn == "HardSwish":
            self._f_elementwise(node, "HARD_SWISH", [x])
        elif fn == "LeakyRelu":
            self._f_elementwise(node, "LEAKY_RELU", [x], ("LeakyReluOptions", {"Alpha": float(attrs["alpha"])}))
        elif fn == "Elu" and float(attrs.get("alpha", 1.0)) == 1.0:
            self._f_elementwise(node, "ELU", [x])
        elif fn == "Gelu":
            self._f_elementwise(node, "GELU", [x], ("GeluOptions", {"Approximate": attrs.get("approximate") == "tanh"}))
        elif fn == "Silu" and ("gate_scale" not in attrs or attrs["gate_bits"] <= 8):  # x * sigmoid(x)
            shape = self.m.tensors[x].shape
            sig = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_logistic"), shape, np.float32))
            self.m.add_op("LOGISTIC", [x], [sig])
            if "gate_scale" in attrs:  # a gated SiLU: the sigmoid quantized to the gate's codes and back
                gate = gate_qparams(IntNode("LUT", node.name, [], [], attrs))
                codes = self.act(self.fresh(f"{node.name}_gate"), gate, shape)
                self.m.add_op("QUANTIZE", [sig], [codes])
                sig = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_gate_float"), shape, np.float32))
                self.m.add_op("DEQUANTIZE", [codes], [sig])
            self._f_elementwise(node, "MUL", [x, sig], ("MulOptions", {}))
        elif fn == "HardSigmoid":  # clip(alpha x + beta, 0, 1): torch's 1/6, 1/2; ONNX's defaults 0.2, 0.5
            alpha = float(attrs.get("alpha", 0.2)) if onnx_defaults else 1 / 6
            shape = self.m.tensors[x].shape
            t = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_scaled"), shape, np.float32))
            self.m.add_op("MUL", [x, self.m.const(self.fresh(f"{node.name}_alpha"), np.array([alpha], np.float32))],
                          [t], ("MulOptions", {}))
            u = self.m.add_tensor(Tensor(self.fresh(f"{node.name}_shifted"), shape, np.float32))
            beta = np.array([attrs.get("beta", 0.5) if onnx_defaults else 0.5], np.float32)
            self.m.add_op("ADD", [t, self.m.const(self.fresh(f"{node.name}_beta"), beta)], [u], ("AddOptions", {}))
            self._f_clip(node, u, 0.0, 1.0)
        else:
            raise EdgeslimError(f"float {fn} ({node.name}) has no float TFLite builtin in edgeslim's exporter: "
                                "quantize it (no float plan for it) or use --formats onnx")

    def _float_activation(self, node: IntNode, shape_in) -> None:
        self.float_op(node)
        self._f_activation(node, node.op, self.fin(node.inputs[0]), node.attrs)

    op_Sigmoid = op_Tanh = op_HardSwish = op_HardSigmoid = op_LeakyRelu = op_Elu = op_Gelu = op_Silu = op_Mish = \
        _float_activation

    def _float_weights(self, node: IntNode) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's float32 weights and bias, as the engine's float path computes them."""
        a = node.arrays
        if "w_float" in a:
            w = a["w_float"].astype(np.float32)
        else:
            shape = (-1,) + (1,) * (a["w"].ndim - 1)
            w = ((a["w"].astype(np.float32) - a["w_zero_point"].reshape(shape)) * a["w_scale"].reshape(shape))
        b = None
        if "bias" in a:
            scale = np.float32(self.g.qparams[node.inputs[0]].scale) * a["w_scale"].astype(np.float32)
            b = a["bias"].astype(np.float32) * scale
        elif "b_float" in a:
            b = a["b_float"].astype(np.float32)
        return w.astype(np.float32), None if b is None else np.asarray(b, np.float32).reshape(-1)

    def op_Conv(self, node: IntNode, shape_in) -> None:
        """A float convolution (an FP32 layer of a mixed plan): float32 CONV_2D / DEPTHWISE_CONV_2D."""
        self.float_op(node, "Conv")
        at = node.attrs
        w, b = self._float_weights(node)
        o, cg, kh, kw = w.shape
        in_shape, out_shape = self.shapes[node.inputs[0]], self.shapes[node.outputs[0]]
        padding, x = self._padding(node, (kh, kw), in_shape, out_shape, None)
        bias = self.m.const(f"{node.name}_bias", b if b is not None else np.zeros(w.shape[0], np.float32))
        act = act_code({"relu": "RELU", "relu6": "RELU6"}.get(at.get("act"), "NONE"))
        sh, sw = at["strides"]
        dh, dw = at["dilations"]
        if at["group"] == 1:
            weights = self.m.const(f"{node.name}_weights", np.ascontiguousarray(w.transpose(0, 2, 3, 1)))
            self._f_elementwise(node, "CONV_2D", [x, weights, bias], ("Conv2DOptions", {
                "Padding": padding, "StrideW": sw, "StrideH": sh, "DilationWFactor": dw, "DilationHFactor": dh,
                "FusedActivationFunction": act}))
        elif at["group"] == in_shape[1] and cg == 1:
            weights = self.m.const(f"{node.name}_weights", np.ascontiguousarray(w.transpose(1, 2, 3, 0)))
            self._f_elementwise(node, "DEPTHWISE_CONV_2D", [x, weights, bias], ("DepthwiseConv2DOptions", {
                "Padding": padding, "StrideW": sw, "StrideH": sh, "DepthMultiplier": o // in_shape[1],
                "DilationWFactor": dw, "DilationHFactor": dh, "FusedActivationFunction": act}))
        else:
            raise EdgeslimError(f"conv {node.name} is grouped ({at['group']} groups): TFLite has only plain and "
                                "depthwise convolutions")

    def op_Gemm(self, node: IntNode, shape_in) -> None:
        """A float linear layer: float32 FULLY_CONNECTED."""
        self.float_op(node, "Gemm")
        w, b = self._float_weights(node)
        in_shape = self.shapes[node.inputs[0]]
        x = self.fin(node.inputs[0])
        if len(in_shape) != 2:
            x = self._reshape(x, in_shape, (in_shape[0], int(np.prod(in_shape[1:]))), node.name)
        weights = self.m.const(f"{node.name}_weights", np.ascontiguousarray(w.reshape(w.shape[0], -1)))
        bias = self.m.const(f"{node.name}_bias", b) if b is not None else -1
        self._f_elementwise(node, "FULLY_CONNECTED", [x, weights, bias],
                            ("FullyConnectedOptions", {"FusedActivationFunction": 0}))

    def op_FloatIsland(self, node: IntNode, shape_in) -> None:
        """A float island held as a small ONNX graph (``engine.float_ops.FloatIsland`` runs it): each ONNX node as
        its float TFLite builtin(s); intermediate tensors get their shapes from one reference run at batch 1."""
        import onnx
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        model = onnx.load_from_string(node.arrays["onnx"].tobytes())
        graph = model.graph
        if len(node.outputs) != 1 or len(graph.output) != 1:
            raise EdgeslimError(f"float island {node.name} has {len(node.outputs)} outputs: not exportable to "
                                "TFLite yet")
        rename = {i.name: n for i, n in zip(graph.input, node.inputs)}
        rename[graph.output[0].name] = node.outputs[0]

        def nm(x: str) -> str:
            return rename.get(x, f"{node.name}::{x}")

        consts = {nm(i.name): numpy_helper.to_array(i) for i in graph.initializer}
        inner = [o for n in graph.node for o in n.output if o and o != graph.output[0].name]
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend([helper.make_tensor_value_info(o, 0, None) for o in inner])
        feeds = {i.name: np.zeros(self.shapes[n], np.float32) for i, n in zip(graph.input, node.inputs)}
        try:
            with np.errstate(all="ignore"):  # zeros may divide by zero: only the shapes are read
                values = ReferenceEvaluator(probe).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - named in the one-line error
            raise EdgeslimError(f"float island {node.name} ({node.attrs.get('fn')}): its shapes could not be "
                                f"computed for TFLite ({str(exc).splitlines()[0][:80]})") from None
        for o, v in zip([graph.output[0].name, *inner], values):
            self.shapes.setdefault(nm(o), tuple(np.shape(v)))
        self.float_op(node)
        for k, src in enumerate(graph.node):
            attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
            if src.op_type == "Constant" and "value" in attrs:
                consts[nm(src.output[0])] = numpy_helper.to_array(attrs["value"])
                continue
            step = IntNode(src.op_type, f"{node.name}_{k}", [nm(i) if i else "" for i in src.input],
                           [nm(o) for o in src.output if o])
            if len(step.outputs) != 1:
                raise EdgeslimError(f"float {src.op_type} in {node.name} has several outputs: not exportable to "
                                    "TFLite yet")
            self._onnx_float(step, attrs, consts, model.opset_import[0].version)

    def _onnx_float(self, node: IntNode, attrs: dict, consts: dict, opset: int) -> None:
        """One float ONNX node (inputs: float tensors or constants) as TFLite float builtins."""
        fn = node.op
        out_shape = self.shapes[node.outputs[0]]
        nd = len(out_shape)

        def operand(k: int) -> int:
            name = node.inputs[k]
            if name in consts:
                return self.fconst(f"{node.name}_c{k}", consts[name], nd)
            return self.fin(name)

        def const(k: int):
            return consts.get(node.inputs[k]) if len(node.inputs) > k and node.inputs[k] else None

        unary = {"Exp": "EXP", "Log": "LOG", "Sqrt": "SQRT", "Neg": "NEG", "Abs": "ABS", "Floor": "FLOOR",
                 "Ceil": "CEIL", "Sin": "SIN", "Cos": "COS", "Relu": "RELU"}
        binary = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAXIMUM", "Min": "MINIMUM",
                  "Pow": "POW", "PRelu": "PRELU"}
        in_shape = self.shapes.get(node.inputs[0]) if node.inputs and node.inputs[0] not in consts else None
        if fn in unary:
            self._f_elementwise(node, unary[fn], [operand(0)])
        elif fn in binary and len(node.inputs) == 2:
            self._f_binary(node, binary[fn], operand(0), operand(1))
        elif fn in ("Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Gelu"):
            self._f_activation(node, fn, operand(0), attrs, onnx_defaults=True)
        elif fn == "Clip":
            lo, hi = const(1), const(2)
            self._f_clip(node, operand(0), -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))
        elif fn == "Identity" or fn == "Cast" and attrs.get("to") == 1:  # TensorProto.FLOAT
            self._alias_output(node, operand(0))
        elif fn in ("Reshape", "Flatten", "Squeeze", "Unsqueeze") and in_shape is not None:
            self._alias_output(node, self._reshape(operand(0), in_shape, out_shape, node.name))
        elif fn == "Transpose" and in_shape is not None:
            perm = attrs.get("perm", list(range(len(in_shape)))[::-1])
            perm = then(then(inverse(layout(len(in_shape))), perm), layout(nd))
            self._alias_output(node, self._transpose(operand(0), perm, stored(out_shape), node.name))
        elif fn == "Concat":
            self._f_elementwise(node, "CONCATENATION", [operand(k) for k in range(len(node.inputs))],
                                ("ConcatenationOptions", {"Axis": layout(nd).index(attrs["axis"] % nd),
                                                          "FusedActivationFunction": 0}))
        elif fn == "Softmax" and (attrs.get("axis", -1) % nd == nd - 1 or opset >= 13):
            self._softmax(node, operand(0), attrs.get("axis", -1))
        elif fn == "Gather" and const(1) is not None and in_shape is not None:
            self._gather(node, operand(0), in_shape, attrs.get("axis", 0), const(1))
        elif fn in ("ReduceMean", "ReduceSum", "ReduceMax") and in_shape is not None:
            axes = attrs.get("axes", const(1))
            axes = list(range(len(in_shape))) if axes is None else [int(a) for a in np.ravel(axes)]
            code = {"ReduceMean": "MEAN", "ReduceSum": "SUM", "ReduceMax": "REDUCE_MAX"}[fn]
            self._f_mean(node, operand(0), axes, bool(attrs.get("keepdims", 1)), code)
        else:
            raise EdgeslimError(f"float {fn} ({node.name}) has no float TFLite builtin in edgeslim's exporter: "
                                "use --formats onnx, or open an issue with the model")
