"""Float islands of a mixed-precision ``IntGraph``, in numpy float32 (ONNX op names and semantics).

Integer inputs are dequantized first (``DequantizeLinear``), FP16 tensors are held as float16 arrays and
widened to float32 for arithmetic, exactly as the exported ONNX graph does (``export.onnx_qdq``). Float
arithmetic is summed in a different order than onnxruntime's kernels, so float outputs agree to float32
rounding, not bit for bit; the integer parts stay exact.
"""

from __future__ import annotations

import numpy as np

from ..intgraph import IntGraph, IntNode
from . import ops

__all__ = ["as_float", "Conv", "Gemm", "data_movement", "ACTIVATIONS", "FloatIsland", "OPS"]


def as_float(g: IntGraph, name: str, env: dict) -> np.ndarray:
    x = env[name]
    if name in g.qparams:
        q = g.qparams[name]
        return ops.DequantizeLinear(x, q.scale, q.zero_point)
    return np.asarray(x, dtype=np.float32)


def _weights(g: IntGraph, node: IntNode) -> tuple[np.ndarray, np.ndarray | None]:
    a = node.arrays
    if "w_float" in a:
        w = a["w_float"].astype(np.float32)
    else:
        shape = (-1,) + (1,) * (a["w"].ndim - 1)
        w = (a["w"].astype(np.float32) - a["w_zero_point"].reshape(shape)) * a["w_scale"].reshape(shape)
    if "bias" in a:  # int32 codes with scale in_scale * w_scale, as DequantizeLinear of the bias computes
        scale = np.float32(g.qparams[node.inputs[0]].scale) * a["w_scale"].astype(np.float32)
        b = a["bias"].astype(np.float32) * scale
    else:
        b = a["b_float"].astype(np.float32) if "b_float" in a else None
    return w, b


def _act(y: np.ndarray, act: str | None) -> np.ndarray:
    if act == "relu":
        return np.maximum(y, 0)
    if act == "relu6":
        return np.clip(y, 0, 6)
    return y


def Conv(g, node, env, cfg):
    at = node.attrs
    x = as_float(g, node.inputs[0], env)
    w, b = _weights(g, node)
    O, Cg, kh, kw = w.shape
    cols, (N, Ho, Wo) = ops.im2col(x, (kh, kw), at["strides"], at["pads"], at["dilations"], at["group"])
    G = at["group"]
    wk = w.reshape(G, O // G, Cg, kh * kw).transpose(0, 1, 3, 2).reshape(G, O // G, kh * kw * Cg)
    y = np.matmul(cols.astype(np.float32), wk.transpose(0, 2, 1))  # (G, M, Og)
    y = y.transpose(1, 0, 2).reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return _act(np.ascontiguousarray(y, dtype=np.float32), at.get("act"))


def Gemm(g, node, env, cfg):
    x = as_float(g, node.inputs[0], env)
    w, b = _weights(g, node)
    y = x.reshape(len(x), -1) @ w.T
    return (y + b if b is not None else y).astype(np.float32)


def _pool(node, x):
    if node.op == "GlobalAveragePool":
        return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)
    if node.op == "ReduceMean":
        return x.mean(axis=tuple(node.attrs["axes"]), keepdims=bool(node.attrs.get("keepdims", 1)), dtype=np.float32)
    kh, kw = node.attrs["kernel_shape"]
    s = node.attrs["strides"]
    pads = node.attrs.get("pads")
    if pads and any(pads):  # count_include_pad: the zeros count in the average
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::s[0], ::s[1]]
    return win.mean(axis=(-1, -2), dtype=np.float32)


def data_movement(g, node, env, cfg):
    """MaxPool / Slice / Pad / Flatten / Identity on a float tensor (zero padding pads with 0.0)."""
    x = as_float(g, node.inputs[0], env)
    a = node.attrs
    if node.op == "MaxPool":
        pads = a.get("pads", (0, 0, 0, 0))
        xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=-np.inf)
        kh, kw = a["kernel_shape"]
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::a["strides"][0],
                                                                                   ::a["strides"][1]]
        return win.max(axis=(-1, -2))
    if node.op == "Slice":
        return ops.Slice(x, a["starts"], a["ends"], a["axes"], a.get("steps"))
    if node.op == "Pad":
        return ops.Pad(x, a["pads"], 0.0)
    if node.op == "Flatten":
        return ops.Flatten(x, a.get("axis", 1))
    if node.op == "Reshape":
        return ops.Reshape(x, a["shape"])
    if node.op == "Transpose":
        return ops.Transpose(x, a["perm"])
    if node.op == "Gather":
        return ops.Gather(x, a["axis"], a["index"])
    if node.op == "Resize":
        return ops.Resize(x, scales=a.get("scales"), coordinate_transformation_mode=a["coordinate_transformation_mode"],
                          nearest_mode=a["nearest_mode"])
    return x


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _gate(s: np.ndarray, a: dict) -> np.ndarray:
    """A gated SiLU's quantized sigmoid (QuantizeLinear then DequantizeLinear with the gate's parameters)."""
    bits, signed = a["gate_bits"], a["gate_signed"]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = ops.QuantizeLinear(s.astype(np.float32), a["gate_scale"], a["gate_zero_point"], lo, hi)
    return ops.DequantizeLinear(codes, a["gate_scale"], a["gate_zero_point"])


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(x.astype(np.float64))


ACTIVATIONS = {  # float islands: the ONNX definitions (Silu = x * Sigmoid(x), Gelu/Mish as in opsets 18 / 20)
    "Silu": lambda x, a: x * (_gate(_sigmoid(x), a) if "gate_scale" in a else _sigmoid(x)),
    "Sigmoid": lambda x, a: _sigmoid(x),
    "HardSwish": lambda x, a: x * np.clip(x / 6.0 + 0.5, 0, 1),
    "HardSigmoid": lambda x, a: np.clip(x / 6.0 + 0.5, 0, 1),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, x * np.float32(a["alpha"])),
    "Tanh": lambda x, a: np.tanh(x),
    "Elu": lambda x, a: np.where(x > 0, x, np.float32(a["alpha"]) * (np.exp(x) - 1)),
    "Gelu": lambda x, a: (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
                          if a.get("approximate") == "tanh" else 0.5 * x * (1 + _erf(x / np.sqrt(2)))),
    "Mish": lambda x, a: x * np.tanh(np.log1p(np.exp(x))),
}


_ISLANDS: dict[bytes, object] = {}


def FloatIsland(g, node, env, cfg):
    """An op with no integer form, evaluated from its ONNX graph by ONNX's reference implementation (numpy)."""
    from onnx.reference import ReferenceEvaluator

    key = node.arrays["onnx"].tobytes()
    if key not in _ISLANDS:
        if len(_ISLANDS) > 256:
            _ISLANDS.clear()
        _ISLANDS[key] = ReferenceEvaluator(key)
    feeds = {i.name: as_float(g, n, env) if n in g.qparams else np.asarray(env[n])
             for i, n in zip(_ISLANDS[key].proto_.graph.input, node.inputs)}
    outs = _ISLANDS[key].run(None, feeds)
    return outs if len(node.outputs) > 1 else outs[0]


OPS = {
    "FloatIsland": FloatIsland,
    **{op: (lambda fn: lambda g, n, env, cfg: fn(as_float(g, n.inputs[0], env), n.attrs).astype(np.float32))(fn)
       for op, fn in ACTIVATIONS.items()},
    "Conv": Conv,
    "Gemm": Gemm,
    "Add": lambda g, n, env, cfg: (as_float(g, n.inputs[0], env) + as_float(g, n.inputs[1], env)).astype(np.float32),
    "Mul": lambda g, n, env, cfg: (as_float(g, n.inputs[0], env) * as_float(g, n.inputs[1], env)).astype(np.float32),
    "Concat": lambda g, n, env, cfg: np.concatenate([as_float(g, i, env) for i in n.inputs], axis=n.attrs["axis"]),
    "Relu": lambda g, n, env, cfg: np.maximum(as_float(g, n.inputs[0], env), np.float32(0)),
    "Clip": lambda g, n, env, cfg: np.clip(as_float(g, n.inputs[0], env), n.attrs["min"], n.attrs["max"]),
    "GlobalAveragePool": lambda g, n, env, cfg: _pool(n, as_float(g, n.inputs[0], env)),
    "ReduceMean": lambda g, n, env, cfg: _pool(n, as_float(g, n.inputs[0], env)),
    "AveragePool": lambda g, n, env, cfg: _pool(n, as_float(g, n.inputs[0], env)),
    "Softmax": lambda g, n, env, cfg: _softmax(as_float(g, n.inputs[0], env), n.attrs["axis"]),
    "Cast": lambda g, n, env, cfg: as_float(g, n.inputs[0], env).astype(
        np.float16 if n.attrs["to"] == "float16" else np.float32),
}
