"""LiteRT (TFLite) int8 flatbuffer -> ``IntGraph`` (``edgeslim.import_tflite``), so the engine runs it.

    g = import_tflite("model_int8.tflite")
    y = engine.run(g, x, requant="tflite")   # x: float N, C, H, W; the file's own arithmetic

Read with the ``tflite`` schema package (no TensorFlow). TFLite stores 4-D activations NHWC; the IntGraph is
NCHW, so every 4-D tensor is taken as its NCHW view and ops whose meaning depends on the layout are translated:
conv weights OHWI -> OIHW, SAME padding -> explicit pads, concat / slice axes mapped, RESHAPE / TRANSPOSE of 4-D
tensors wrapped in IntGraph Transposes so the bytes move as in the file. int8 codes are the IntGraph's natural
codes (signed 8-bit ``QParams``).

Supported: QUANTIZE (float -> int8; int8 -> int8 as a one-input QLinearConcat, the IntGraph's requantization),
DEQUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MUL, CONCATENATION, AVERAGE_POOL_2D (VALID),
MAX_POOL_2D (a PADV2 with -128 before it folds into its pads), MEAN over H, W, PAD, RESHAPE, TRANSPOSE,
STRIDED_SLICE (no masks), RESIZE_NEAREST_NEIGHBOR (no align_corners / half-pixel centres), RELU / RELU6,
LEAKY_RELU / LOGISTIC / HARD_SWISH (as LUT nodes whose table the TFLite kernel computes), MAXIMUM / MINIMUM with a
constant after a single-consumer op (folded into its clamp), edgeslim's table lookup (CAST, ADD 128, GATHER),
GATHER at constant positions (int8 or float: channel shuffles), and float islands: DEQUANTIZE, float RESHAPE /
TRANSPOSE / GATHER, float SOFTMAX (a ``Softmax`` node), QUANTIZE back to int8.
Anything else ends in one ``EdgeslimError`` naming the op. Checked on files edgeslim writes (round trip:
``tests/export/test_tflite.py``); files from TensorFlow's converter use the same builtins but were not available here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine import tflite_ops
from ..errors import EdgeslimError
from ..intgraph import IntGraph, IntNode, QParams
from ..quant.fixed_point import multiplier_arrays

__all__ = ["TO_NCHW", "TO_NHWC", "ACTIVATIONS", "import_tflite"]


TO_NCHW = (0, 3, 1, 2)  # logical = stored.transpose(TO_NCHW) for 4-D tensors
TO_NHWC = (0, 2, 3, 1)
ACTIVATIONS = {0: "NONE", 1: "RELU", 3: "RELU6"}


def _schema():
    try:
        import tflite
    except ImportError:
        raise EdgeslimError("reading .tflite files needs the tflite extra: pip install -e '.[tflite]'") from None
    return tflite


def _options(tflite, op, name: str):
    table = op.BuiltinOptions()
    if table is None:
        return None
    opt = getattr(tflite, name)()
    opt.Init(table.Bytes, table.Pos)
    return opt


class _Reader:
    """The flatbuffer as plain tensors (name, shape, dtype, constant data, quantization) and operators."""

    def __init__(self, buf: bytes) -> None:
        tflite = _schema()
        self.tflite = tflite
        try:
            model = tflite.Model.GetRootAs(buf, 0)
            sub = model.Subgraphs(0)
        except Exception:
            raise EdgeslimError("file is not a TFLite flatbuffer: pass a .tflite model") from None
        if model.SubgraphsLength() != 1:
            raise EdgeslimError(f"model has {model.SubgraphsLength()} subgraphs: only single-subgraph models import")
        types = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
        names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self.tensors = []
        for i in range(sub.TensorsLength()):
            t = sub.Tensors(i)
            q = t.Quantization()
            scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None
            data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() else 0
            dtype = {"FLOAT32": np.float32, "INT8": np.int8, "INT32": np.int32, "UINT8": np.uint8,
                     "INT16": np.int16, "INT64": np.int64}.get(types.get(t.Type()))
            const = None
            if not isinstance(data, int) and dtype is not None:
                const = np.frombuffer(data.tobytes(), dtype=dtype).reshape(t.ShapeAsNumpy() if t.ShapeLength() else ())
            self.tensors.append({
                "name": t.Name().decode(), "shape": [int(v) for v in (t.ShapeAsNumpy() if t.ShapeLength() else [])],
                "type": types.get(t.Type()), "data": const,
                "scale": None if scale is None else [float(v) for v in scale],
                "zero_point": None if scale is None else [int(v) for v in q.ZeroPointAsNumpy()],
                "axis": 0 if q is None else int(q.QuantizedDimension())})
        self.ops = []
        for i in range(sub.OperatorsLength()):
            op = sub.Operators(i)
            oc = model.OperatorCodes(op.OpcodeIndex())
            code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
            self.ops.append({"code": names.get(code, str(code)), "op": op,
                             "inputs": [int(v) for v in op.InputsAsNumpy()],
                             "outputs": [int(v) for v in op.OutputsAsNumpy()]})
        self.inputs = [int(v) for v in sub.InputsAsNumpy()]
        self.outputs = [int(v) for v in sub.OutputsAsNumpy()]


def _same_pads(in_hw, k, strides, dilations) -> list[int]:
    """TFLite SAME padding as IntGraph pads [top, left, bottom, right] (the extra pixel goes after)."""
    pads = [0, 0, 0, 0]
    for d in range(2):
        out = -(-in_hw[d] // strides[d])
        eff = (k[d] - 1) * dilations[d] + 1
        total = max((out - 1) * strides[d] + eff - in_hw[d], 0)
        pads[d], pads[d + 2] = total // 2, total - total // 2
    return pads


class _Importer:
    def __init__(self, r: _Reader) -> None:
        self.r = r
        self.g: IntGraph | None = None
        self.names: dict[int, str] = {}  # flatbuffer tensor -> IntGraph tensor (NCHW view)
        self.count = 0
        self.consumers: dict[int, list[int]] = {}
        for k, op in enumerate(r.ops):
            for i in op["inputs"]:
                self.consumers.setdefault(i, []).append(k)
        self.skip: set[int] = set()

    # helpers ---------------------------------------------------------------
    def t(self, i: int) -> dict:
        return self.r.tensors[i]

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}__{self.count}"

    def qparams(self, i: int) -> QParams:
        t = self.t(i)
        if t["type"] != "INT8" or t["scale"] is None or len(t["scale"]) != 1:
            raise EdgeslimError(f"tensor {t['name']} is {t['type']} without one scale: only int8 activations import")
        return QParams(float(t["scale"][0]), int(t["zero_point"][0]), 8, True)

    def define(self, i: int, name: str | None = None) -> str:
        name = name or self.t(i)["name"]
        self.names[i] = name
        if self.t(i)["type"] == "INT8":
            self.g.qparams[name] = self.qparams(i)
        return name

    def node(self, op: str, ins: list[str], out_i: int | None, attrs=None, arrays=None, out: str | None = None) -> str:
        out = out or self.define(out_i)
        self.g.nodes.append(IntNode(op, out, ins, [out], attrs or {}, arrays or {}))
        return out

    def clamp(self, act: int, i: int) -> tuple[int, int]:
        if act not in ACTIVATIONS:
            raise EdgeslimError(f"fused activation {act} of {self.t(i)['name']} is not supported: only NONE, RELU, RELU6")
        q = self.qparams(i)
        return tflite_ops.activation_range(ACTIVATIONS[act], q.scale, q.zero_point)

    def const(self, i: int) -> np.ndarray:
        data = self.t(i)["data"]
        if data is None:
            raise EdgeslimError(f"tensor {self.t(i)['name']} must be a constant")
        return data

    def transpose(self, src: str, perm, q: QParams | None, base: str) -> str:
        out = self.fresh(base)
        if q is not None:
            self.g.qparams[out] = q
        self.g.nodes.append(IntNode("Transpose", out, [src], [out], {"perm": list(perm)}))
        return out

    # the walk --------------------------------------------------------------
    def run(self) -> IntGraph:
        r = self.r
        if len(r.inputs) != 1:
            raise EdgeslimError(f"model has {len(r.inputs)} inputs: only single-input models import")
        t_in = self.t(r.inputs[0])
        shape = t_in["shape"]
        logical = (shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape[1:])
        self.g = IntGraph(input_name="input", input_shape=tuple(logical), output_names=[])
        if t_in["type"] == "FLOAT32":
            self.names[r.inputs[0]] = "input"
        else:  # int8 input: the IntGraph quantizes the float input with the file's parameters
            self.node("QuantizeLinear", ["input"], r.inputs[0])
        for k, op in enumerate(r.ops):
            if k in self.skip:
                continue
            handler = getattr(self, f"op_{op['code']}", None)
            if handler is None:
                raise EdgeslimError(f"TFLite op {op['code']} ({self.t(op['outputs'][0])['name']}) is not supported by "
                                    "edgeslim's importer")
            handler(k, op)
        for i in r.outputs:
            name = self.names[i]
            if self.t(i)["type"] == "INT8":
                name = self.node("DequantizeLinear", [name], None, out=self.fresh(f"{name}_float"))
            self.g.output_names.append(name)
            s = self.t(i)["shape"]
            self.g.output_shapes.append(tuple((s[3], s[1], s[2]) if len(s) == 4 else s[1:]))
        return self.g

    # ops -------------------------------------------------------------------
    def op_QUANTIZE(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        if self.t(i)["type"] == "FLOAT32":
            self.node("QuantizeLinear", [self.names[i]], o)
        else:  # int8 -> int8 requantization: a one-input QLinearConcat
            self.node("QLinearConcat", [self.names[i]], o, {"axis": 1})

    def op_DEQUANTIZE(self, k, op):
        self.node("DequantizeLinear", [self.names[op["inputs"][0]]], op["outputs"][0])

    def _weighted(self, k, op, kind: str):
        x_i, w_i = op["inputs"][:2]
        b_i = op["inputs"][2] if len(op["inputs"]) > 2 else -1
        o = op["outputs"][0]
        w = self.const(w_i).astype(np.int32)
        wt = self.t(w_i)
        if any(wt["zero_point"]):
            raise EdgeslimError(f"layer {self.t(o)['name']} has asymmetric weights: only symmetric int8 weights import")
        in_q, out_q = self.qparams(x_i), self.qparams(o)
        if kind == "CONV_2D":
            opt = _options(self.r.tflite, op["op"], "Conv2DOptions")
            w = w.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        elif kind == "DEPTHWISE_CONV_2D":
            opt = _options(self.r.tflite, op["op"], "DepthwiseConv2DOptions")
            w = w[0].transpose(2, 0, 1)[:, None]  # 1HWO -> O1HW
        else:
            opt = _options(self.r.tflite, op["op"], "FullyConnectedOptions")
        o_ch = w.shape[0]
        w_scale = np.broadcast_to(np.asarray(wt["scale"], np.float32), (o_ch,)).copy()
        arrays = {"w": w, "w_scale": w_scale, "w_zero_point": np.zeros(len(wt["scale"]), np.int32),
                  **multiplier_arrays(in_q.scale * w_scale.astype(np.float64) / out_q.scale)}
        if b_i >= 0:
            arrays["bias"] = self.const(b_i).astype(np.int64)
        act = opt.FusedActivationFunction() if opt is not None else 0
        attrs = {"w_bits": 8, "per_channel": len(wt["scale"]) > 1, "clamp": self.clamp(act, o),
                 "module": self.t(o)["name"]}
        x = self.names[x_i]
        if kind == "FULLY_CONNECTED":
            xs = self.t(x_i)["shape"]
            if len(xs) == 4:  # TFLite flattens NHWC bytes
                x = self.transpose(x, TO_NHWC, in_q, f"{x}_nhwc")
            if len(xs) != 2:
                flat = self.fresh(f"{x}_flat")
                self.g.qparams[flat] = in_q
                self.g.nodes.append(IntNode("Flatten", flat, [x], [flat], {"axis": 1}))
                x = flat
            self.node("QGemm", [x], o, attrs, arrays)
            return
        strides = [opt.StrideH(), opt.StrideW()]
        dil = [opt.DilationHFactor(), opt.DilationWFactor()]
        hw = self.t(x_i)["shape"][1:3]
        pads = _same_pads(hw, w.shape[2:], strides, dil) if opt.Padding() == 0 else [0, 0, 0, 0]
        group = 1 if kind == "CONV_2D" else self.t(x_i)["shape"][3]
        attrs.update(strides=strides, pads=pads, dilations=dil, group=group)
        self.node("QLinearConv", [x], o, attrs, arrays)

    def op_CONV_2D(self, k, op):
        self._weighted(k, op, "CONV_2D")

    def op_DEPTHWISE_CONV_2D(self, k, op):
        self._weighted(k, op, "DEPTHWISE_CONV_2D")

    def op_FULLY_CONNECTED(self, k, op):
        self._weighted(k, op, "FULLY_CONNECTED")

    def _binary(self, op, kind: str, options: str):
        a, b = op["inputs"][:2]
        o = op["outputs"][0]
        opt = _options(self.r.tflite, op["op"], options)
        act = opt.FusedActivationFunction() if opt is not None else 0
        self.node(kind, [self.names[a], self.names[b]], o, {"clamp": self.clamp(act, o)})

    def op_ADD(self, k, op):
        if self.t(op["outputs"][0])["type"] == "INT32":
            return  # part of the table lookup (CAST, ADD 128, GATHER): op_GATHER reads it
        self._binary(op, "QLinearAdd", "AddOptions")

    def op_MUL(self, k, op):
        self._binary(op, "QLinearMul", "MulOptions")

    def op_CAST(self, k, op):
        if self.t(op["outputs"][0])["type"] != "INT32":
            raise EdgeslimError("TFLite op CAST is supported only as part of edgeslim's table lookup")

    def op_GATHER(self, k, op):
        """edgeslim's LUT: GATHER(table int8 [256], CAST(x) + 128)."""
        table_i, idx_i = op["inputs"]
        add = next((p for p in self.r.ops if idx_i in p["outputs"] and p["code"] == "ADD"), None)
        cast = add and next((p for p in self.r.ops if add["inputs"][0] in p["outputs"] and p["code"] == "CAST"), None)
        table = self.t(table_i)["data"]
        if cast is not None and table is not None and table.shape == (256,) and \
                int(np.asarray(self.const(add["inputs"][1])).reshape(-1)[0]) == 128:
            self._lut(op["outputs"][0], cast["inputs"][0], table.astype(np.int64), "table", {})
            return
        self._gather(op)

    def _gather(self, op):
        """GATHER of a tensor (int8 or float) at constant positions: an IntGraph Gather along the axis as the
        importer sees it (4-D tensors NCHW), then the Transpose that puts the result in the order the file stores
        the output in (a scalar index removes the axis, so a 4-D input can give a 3-D output and back)."""
        x_i, idx_i = op["inputs"]
        o = op["outputs"][0]
        index = np.asarray(self.const(idx_i)).astype(np.int64)
        in_nd, out_nd = len(self.t(x_i)["shape"]), len(self.t(o)["shape"])
        axis = int(_options(self.r.tflite, op["op"], "GatherOptions").Axis()) % in_nd
        if index.ndim > 1:
            raise EdgeslimError(f"GATHER {self.t(o)['name']} with {index.ndim}-D indices does not import")
        p_in = TO_NCHW if in_nd == 4 else tuple(range(in_nd))
        p_out = TO_NCHW if out_nd == 4 else tuple(range(out_nd))
        # stored input axes in the order the IntGraph Gather leaves them, and in the order the file stores them
        kept = [a for a in p_in if a != axis] if index.ndim == 0 else list(p_in)
        stored = sorted(kept) if index.ndim == 0 else list(range(in_nd))
        perm = [kept.index(stored[p_out[k]]) for k in range(out_nd)]
        q = self.qparams(x_i) if self.t(x_i)["type"] == "INT8" else None
        attrs = {"axis": p_in.index(axis), "index": int(index) if index.ndim == 0 else index.tolist()}
        if perm == list(range(out_nd)):
            self.node("Gather", [self.names[x_i]], o, attrs)
            return
        mid = self.fresh(f"{self.t(o)['name']}_gathered")
        if q is not None:
            self.g.qparams[mid] = q
        self.g.nodes.append(IntNode("Gather", mid, [self.names[x_i]], [mid], attrs))
        self.node("Transpose", [mid], o, {"perm": perm})

    def op_SOFTMAX(self, k, op):
        """Float SOFTMAX (a float island of the file) over the last stored axis."""
        (x_i,), (o,) = op["inputs"], op["outputs"]
        if self.t(x_i)["type"] != "FLOAT32":
            raise EdgeslimError(f"SOFTMAX {self.t(o)['name']} on {self.t(x_i)['type']}: only float SOFTMAX imports")
        beta = float(_options(self.r.tflite, op["op"], "SoftmaxOptions").Beta())
        if beta != 1.0:
            raise EdgeslimError(f"SOFTMAX {self.t(o)['name']} with beta {beta}: only beta 1 imports")
        nd = len(self.t(x_i)["shape"])
        axis = (TO_NCHW if nd == 4 else tuple(range(nd))).index(nd - 1)
        self.node("Softmax", [self.names[x_i]], o, {"axis": axis})

    def _lut(self, o: int, x_i: int, table: np.ndarray, fn: str, extra: dict):
        """An elementwise int8 op as an IntGraph LUT: one output code per input code -128..127."""
        self.qparams(x_i)
        self.node("LUT", [self.names[x_i]], o, {"fn": fn, **extra, "clamp": (-128, 127)},
                  {"table": np.asarray(table, np.int64)})

    def _codes(self) -> np.ndarray:
        return np.arange(-128, 128, dtype=np.int64)

    def op_LEAKY_RELU(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        alpha = float(_options(self.r.tflite, op["op"], "LeakyReluOptions").Alpha())
        qx, qy = self.qparams(i), self.qparams(o)
        table = tflite_ops.leaky_relu(self._codes(), qx.scale, qx.zero_point, qy.scale, qy.zero_point, alpha)
        self._lut(o, i, table, "leaky_relu", {"alpha": alpha})

    def op_LOGISTIC(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        qx, qy = self.qparams(i), self.qparams(o)
        if (np.float32(qy.scale), qy.zero_point) != (np.float32(1 / 256), -128):
            raise EdgeslimError(f"LOGISTIC {self.t(o)['name']}: output parameters must be 1/256, -128 (TFLite's)")
        self._lut(o, i, tflite_ops.logistic(self._codes(), qx.scale, qx.zero_point), "sigmoid", {"tflite_op": "LOGISTIC"})

    def op_HARD_SWISH(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        qx, qy = self.qparams(i), self.qparams(o)
        table = tflite_ops.hard_swish(self._codes(), qx.scale, qx.zero_point, qy.scale, qy.zero_point)
        self._lut(o, i, table, "hardswish", {"tflite_op": "HARD_SWISH"})

    def op_RELU(self, k, op):
        self._relu(op, "RELU")

    def op_RELU6(self, k, op):
        self._relu(op, "RELU6")

    def _relu(self, op, act: str):
        (i,), (o,) = op["inputs"], op["outputs"]
        qy = self.qparams(o)
        self.node("QLinearRelu", [self.names[i]], o,
                  {"clamp": tflite_ops.activation_range(act, qy.scale, qy.zero_point)})

    def _clamp_const(self, op, code: str):
        """MAXIMUM / MINIMUM with a constant: folded into the clamp of the op that produced the input."""
        x_i, c_i = op["inputs"]
        o = op["outputs"][0]
        prev = next((n for n in self.g.nodes if n.outputs[0] == self.names[x_i]), None)
        c = int(np.asarray(self.const(c_i)).reshape(-1)[0])
        if prev is None or "clamp" not in prev.attrs or len(self.consumers.get(x_i, [])) != 1 or \
                self.t(c_i)["scale"] != self.t(x_i)["scale"] or self.t(c_i)["zero_point"] != self.t(x_i)["zero_point"]:
            raise EdgeslimError(f"TFLite op {code} is supported only as a clamp after a single-consumer op")
        lo, hi = prev.attrs["clamp"]
        prev.attrs["clamp"] = (max(lo, c), hi) if code == "MAXIMUM" else (lo, min(hi, c))
        self.names[o] = self.names[x_i]

    def op_MAXIMUM(self, k, op):
        self._clamp_const(op, "MAXIMUM")

    def op_MINIMUM(self, k, op):
        self._clamp_const(op, "MINIMUM")

    def op_CONCATENATION(self, k, op):
        o = op["outputs"][0]
        opt = _options(self.r.tflite, op["op"], "ConcatenationOptions")
        nd = len(self.t(o)["shape"])
        axis = opt.Axis() % nd
        if nd == 4:
            axis = TO_NCHW.index(axis)
        self.node("QLinearConcat", [self.names[i] for i in op["inputs"]], o,
                  {"axis": axis, "clamp": self.clamp(opt.FusedActivationFunction(), o)})

    def op_AVERAGE_POOL_2D(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        opt = _options(self.r.tflite, op["op"], "Pool2DOptions")
        if opt.Padding() == 0 and self.t(i)["shape"][1:3] != self.t(o)["shape"][1:3]:
            raise EdgeslimError(f"AVERAGE_POOL_2D {self.t(o)['name']} with SAME padding does not import yet")
        if self.qparams(i) != self.qparams(o):
            raise EdgeslimError(f"AVERAGE_POOL_2D {self.t(o)['name']}: input and output parameters differ")
        self.node("QLinearAveragePool", [self.names[i]], o, {
            "kernel_shape": [opt.FilterHeight(), opt.FilterWidth()], "strides": [opt.StrideH(), opt.StrideW()],
            "clamp": self.clamp(opt.FusedActivationFunction(), o), "tflite_op": "AVERAGE_POOL_2D"})

    def op_MAX_POOL_2D(self, k, op):
        (i,), (o,) = op["inputs"], op["outputs"]
        opt = _options(self.r.tflite, op["op"], "Pool2DOptions")
        kernel, strides = [opt.FilterHeight(), opt.FilterWidth()], [opt.StrideH(), opt.StrideW()]
        pads = _same_pads(self.t(i)["shape"][1:3], kernel, strides, (1, 1)) if opt.Padding() == 0 else [0, 0, 0, 0]
        folded = getattr(self, "_padv2", {}).pop(i, None)
        src = self.names[i] if folded is None else folded[0]
        if folded is not None:  # PADV2(-128) + VALID max pool = a padded max pool
            pads = [a + b for a, b in zip(pads, folded[1])]
        self.node("MaxPool", [src], o, {"kernel_shape": kernel, "strides": strides, "pads": pads})

    def op_MEAN(self, k, op):
        x_i, axes_i = op["inputs"]
        o = op["outputs"][0]
        axes = sorted(int(a) for a in np.asarray(self.const(axes_i)).reshape(-1))
        if axes != [1, 2] or len(self.t(x_i)["shape"]) != 4:
            raise EdgeslimError(f"MEAN {self.t(o)['name']} over axes {axes}: only the spatial mean (1, 2) imports")
        keep = len(self.t(o)["shape"]) == 4
        self.node("QLinearGlobalAveragePool", [self.names[x_i]], o, {"keepdims": keep, "tflite_op": "MEAN"})

    def _paddings(self, i: int, pads_i: int) -> list[int]:
        p = np.asarray(self.const(pads_i)).reshape(-1, 2)
        if len(p) == 4:
            p = p[list(TO_NCHW)]
        return [int(v) for v in p[:, 0]] + [int(v) for v in p[:, 1]]

    def op_PAD(self, k, op):
        x_i, p_i = op["inputs"][:2]
        self.node("Pad", [self.names[x_i]], op["outputs"][0], {"pads": self._paddings(x_i, p_i)})

    def op_PADV2(self, k, op):
        x_i, p_i, v_i = op["inputs"]
        o = op["outputs"][0]
        users = self.consumers.get(o, [])
        value = int(np.asarray(self.const(v_i)).reshape(-1)[0])
        if value != -128 or len(users) != 1 or self.r.ops[users[0]]["code"] != "MAX_POOL_2D":
            raise EdgeslimError("TFLite op PADV2 is supported only with -128 before a MAX_POOL_2D")
        p = self._paddings(x_i, p_i)
        if any(p[i] for i in (0, 1, 4, 5)):
            raise EdgeslimError("PADV2 before a max pool may pad only H and W")
        if not hasattr(self, "_padv2"):
            self._padv2 = {}
        self._padv2[o] = (self.names[x_i], [p[2], p[3], p[6], p[7]])

    def op_RESHAPE(self, k, op):
        x_i, o = op["inputs"][0], op["outputs"][0]
        q = self.qparams(x_i) if self.t(x_i)["type"] == "INT8" else None  # float: a float island's reshape
        src = self.names[x_i]
        if len(self.t(x_i)["shape"]) == 4:
            src = self.transpose(src, TO_NHWC, q, f"{src}_nhwc")
        out_shape = [int(v) for v in self.t(o)["shape"]]
        # the batch dimension follows the input's unless the reshape folds it (FastestDet's channel shuffle)
        shape = [0, *out_shape[1:]] if out_shape[0] == self.t(x_i)["shape"][0] else out_shape
        if len(out_shape) == 4:
            flat = self.fresh(f"{self.t(o)['name']}_nhwc")
            if q is not None:
                self.g.qparams[flat] = q
            self.g.nodes.append(IntNode("Reshape", flat, [src], [flat], {"shape": shape}))
            self.node("Transpose", [flat], o, {"perm": list(TO_NCHW)})
        else:
            self.node("Reshape", [src], o, {"shape": shape})

    def op_TRANSPOSE(self, k, op):
        x_i, p_i = op["inputs"]
        o = op["outputs"][0]
        perm = [int(v) for v in np.asarray(self.const(p_i)).reshape(-1)]
        li = TO_NHWC if len(self.t(x_i)["shape"]) == 4 else tuple(range(len(perm)))
        lo = TO_NCHW if len(self.t(o)["shape"]) == 4 else tuple(range(len(perm)))
        # logical_out = stored_out.transpose(lo) = stored_in.transpose(perm).transpose(lo)
        #             = logical_in.transpose(li).transpose(perm).transpose(lo)
        full = [li[perm[j]] for j in lo]
        self.node("Transpose", [self.names[x_i]], o, {"perm": full})

    def op_STRIDED_SLICE(self, k, op):
        x_i, b_i, e_i, s_i = op["inputs"]
        o = op["outputs"][0]
        opt = _options(self.r.tflite, op["op"], "StridedSliceOptions")
        if opt is not None and (opt.BeginMask() or opt.EndMask() or opt.EllipsisMask() or opt.NewAxisMask()
                                or opt.ShrinkAxisMask()):
            raise EdgeslimError(f"STRIDED_SLICE {self.t(o)['name']} with masks does not import yet")
        b, e, s = (np.asarray(self.const(i)).reshape(-1).astype(int) for i in (b_i, e_i, s_i))
        nd = len(b)
        order = TO_NCHW if nd == 4 else tuple(range(nd))
        axes = list(range(1, nd))  # the batch axis stays whole (the file has batch 1)
        self.node("Slice", [self.names[x_i]], o, {"starts": [int(b[order[a]]) for a in axes],
                                                   "ends": [int(e[order[a]]) for a in axes], "axes": axes,
                                                   "steps": [int(s[order[a]]) for a in axes]})

    def op_RESIZE_NEAREST_NEIGHBOR(self, k, op):
        x_i, o = op["inputs"][0], op["outputs"][0]
        opt = _options(self.r.tflite, op["op"], "ResizeNearestNeighborOptions")
        if opt is not None and (opt.AlignCorners() or opt.HalfPixelCenters()):
            raise EdgeslimError("RESIZE_NEAREST_NEIGHBOR with align_corners / half_pixel_centers does not import yet")
        hi, wi = self.t(x_i)["shape"][1:3]
        ho, wo = self.t(o)["shape"][1:3]
        if ho % hi or wo % wi:
            raise EdgeslimError("RESIZE_NEAREST_NEIGHBOR imports only for integer factors")
        self.node("Resize", [self.names[x_i]], o, {"scales": [1.0, 1.0, ho / hi, wo / wi],
                                                   "coordinate_transformation_mode": "asymmetric",
                                                   "nearest_mode": "floor"})


def import_tflite(path: str | Path | bytes) -> IntGraph:
    """Read an int8 ``.tflite`` file (path or bytes) into an ``IntGraph``; run it with
    ``engine.run(g, x, requant="tflite")`` on float N, C, H, W inputs."""
    buf = bytes(path) if isinstance(path, (bytes, bytearray)) else Path(path).read_bytes()
    return _Importer(_Reader(buf)).run()
