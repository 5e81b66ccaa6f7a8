"""The engine's ``requant="tflite"`` kernels: each IntGraph op computed as the TFLite ops that
``export.tflite`` writes for it compute them (``tflite_ops``), on the engine's natural codes.

Natural codes differ from TFLite's int8 codes by a constant (128 for unsigned 8-bit tensors); every kernel
here depends only on ``code - zero_point``; average pools (global ones too) are the unit-weight depthwise
convolutions ``pool_as_depthwise`` describes. Ops not listed here (data movement, LUT tables) are the same in every
mode (``run.OPS``).
"""

from __future__ import annotations

import numpy as np

from ..intgraph import IntGraph, IntNode, QParams
from . import ops, tflite_ops

__all__ = ["pool_as_depthwise", "LOGISTIC_Q", "gate_qparams", "OPS"]


def _clamp(node: IntNode, q: QParams) -> tuple[int, int]:
    lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
    return max(int(lo), q.qmin), min(int(hi), q.qmax)


def _offset(q: QParams) -> int:
    return 0 if q.signed else 128


def _quantize(g: IntGraph, node: IntNode, env, cfg):
    q = g.qparams[node.outputs[0]]
    return tflite_ops.quantize(env[node.inputs[0]], q.scale, q.zero_point, *_clamp(node, q))


def _dequantize(g: IntGraph, node: IntNode, env, cfg):
    q = g.qparams[node.inputs[0]]
    return tflite_ops.dequantize(env[node.inputs[0]], q.scale, q.zero_point)


def _weighted(g: IntGraph, node: IntNode, env, cfg, conv: bool):
    a, at = node.arrays, node.attrs
    in_q = g.qparams[node.inputs[0]]
    x = env[node.inputs[0]]
    if at.get("float_output"):  # not TFLite-representable (export.tflite.prepare_graph gives it int8 outputs)
        x = x.reshape(x.shape[0], -1)
        return ops.QGemm(x, in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"), x_scale=in_q.scale,
                         w_scale=a["w_scale"], float_output=True)[0]
    out_q = g.qparams[node.outputs[0]]
    m, s = tflite_ops.conv_multipliers(in_q.scale, a["w_scale"], out_q.scale)
    stats = cfg.get("stats")  # overflow statistics, as in the other modes
    kw = dict(m0=m, shift=s, y_zero_point=out_q.zero_point, clamp=_clamp(node, out_q), requant="tflite",
              accumulator_bits=cfg["accumulator_bits"], overflow=cfg["overflow"],
              observer=None if stats is None else stats.observer(node.name, a["w"].shape[0]))
    if conv:
        return ops.QLinearConv(x, in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"), strides=at["strides"],
                               pads=at["pads"], dilations=at["dilations"], group=at["group"], **kw)[0]
    return ops.QGemm(x.reshape(x.shape[0], -1), in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"), **kw)[0]


def _binary(fn):
    def call(g: IntGraph, node: IntNode, env, cfg):
        qa, qb, qy = (g.qparams[n] for n in (*node.inputs[:2], node.outputs[0]))
        return fn(env[node.inputs[0]], qa.scale, qa.zero_point, env[node.inputs[1]], qb.scale, qb.zero_point,
                  qy.scale, qy.zero_point, *_clamp(node, qy))
    return call


def _requant_to(x, src: QParams, dst: QParams) -> np.ndarray:
    """int8 -> int8 QUANTIZE in natural codes (the exporter skips it when the stored parameters are equal)."""
    if np.float32(src.scale) == np.float32(dst.scale) and src.zero_point - _offset(src) == dst.zero_point - _offset(dst):
        return np.asarray(x, np.int64) - _offset(src) + _offset(dst)
    return tflite_ops.requantize(x, src.scale, src.zero_point, dst.scale, dst.zero_point, dst.qmin, dst.qmax)


def _concat(g: IntGraph, node: IntNode, env, cfg):
    qy = g.qparams[node.outputs[0]]
    parts = [_requant_to(env[n], g.qparams[n], qy) for n in node.inputs]
    return np.clip(np.concatenate(parts, axis=node.attrs.get("axis", 1)), *_clamp(node, qy))


def pool_as_depthwise(channels: int, kernel) -> dict[str, np.ndarray]:
    """The depthwise convolution an average pool over ``kernel`` is written as: every weight the int8 code ``u``
    (64, less where 255 * u * kh * kw would leave int32) with the per-channel scale float32(1 / (kh * kw * u)),
    zero bias: the same real weights 1 / (kh * kw). Its DEPTHWISE_CONV_2D rounds the window's sum once
    (``MultiplyByQuantizedMultiplier``), where AVERAGE_POOL_2D + QUANTIZE round twice (the mean on the input's
    scale, then the requantization) and MEAN rounds the requantized sum before dividing; onnxruntime's
    QLinearAveragePool / QLinearGlobalAveragePool round once. ``u`` > 1 gives the fixed-point product
    ``log2(u)`` more fraction bits before its last rounding, so TFLite's two roundings part from one rounding
    ``u`` times less often."""
    kh, kw = (int(k) for k in kernel)
    n = kh * kw
    unit = max(1, min(64, ((1 << 31) - 1) // (255 * n)))
    return {"w": np.full((channels, 1, kh, kw), unit, np.int64),
            "w_scale": np.full(channels, np.float32(1.0 / (n * unit)), np.float32),
            "w_zero_point": np.zeros(channels, np.int64), "bias": np.zeros(channels, np.int64)}


def _pool_conv(g: IntGraph, node: IntNode, x, kernel, strides, cfg) -> np.ndarray:
    """An average pool as ``pool_as_depthwise``'s DEPTHWISE_CONV_2D computes it (VALID)."""
    qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
    x = np.asarray(x)
    a = pool_as_depthwise(x.shape[1], kernel)
    m, s = tflite_ops.conv_multipliers(qx.scale, a["w_scale"], qy.scale)
    return ops.QLinearConv(x, qx.zero_point, a["w"], a["w_zero_point"], a["bias"], strides=tuple(strides),
                           group=x.shape[1], m0=m, shift=s, y_zero_point=qy.zero_point, clamp=_clamp(node, qy),
                           requant="tflite", accumulator_bits=cfg.get("accumulator_bits", 32),
                           overflow=cfg.get("overflow", "saturate"))[0]


def _average_pool(g, node, env, cfg):
    """A pool read from a file's AVERAGE_POOL_2D (``attrs['tflite_op']``, set by ``io.tflite_import``): that
    kernel, on the input's scale (rounding half away from zero sees the sign of the raw int8 sum, so it runs on int8
    codes), then QUANTIZE; any other: ``pool_as_depthwise``."""
    if node.attrs.get("tflite_op") != "AVERAGE_POOL_2D":
        return _pool_conv(g, node, env[node.inputs[0]], node.attrs["kernel_shape"], node.attrs["strides"], cfg)
    qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
    off = _offset(qx)
    pooled = tflite_ops.average_pool(np.asarray(env[node.inputs[0]], np.int64) - off, node.attrs["kernel_shape"],
                                     node.attrs["strides"]) + off
    return np.clip(_requant_to(pooled, qx, qy), *_clamp(node, qy))


def _global_average_pool(g, node, env, cfg):
    """The mean over H, W: a file's MEAN (``attrs['tflite_op']``, from ``io.tflite_import``) as that kernel computes
    it, any other as one unit-weight DEPTHWISE_CONV_2D over the whole map (``pool_as_depthwise``)."""
    x = np.asarray(env[node.inputs[0]])
    keep = bool(node.attrs.get("keepdims", True))
    if node.attrs.get("tflite_op") == "MEAN":
        qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
        return tflite_ops.mean(x, qx.scale, qx.zero_point, qy.scale, qy.zero_point, *_clamp(node, qy), keepdims=keep)
    y = _pool_conv(g, node, x, x.shape[2:], (1, 1), cfg)
    return y if keep else y.reshape(y.shape[0], -1)


def _relu(g, node, env, cfg):
    qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
    return tflite_ops.relu(env[node.inputs[0]], qx.scale, qx.zero_point, qy.scale, qy.zero_point, *_clamp(node, qy))


LOGISTIC_Q = QParams(tflite_ops.LOGISTIC_OUT[0], tflite_ops.LOGISTIC_OUT[1], 8, True)


def gate_qparams(node: IntNode) -> QParams:
    """The quantized sigmoid gate of a gated SiLU LUT (``quant.modules.GatedSiLU``)."""
    a = node.attrs
    return QParams(float(a["gate_scale"]), int(a["gate_zero_point"]), int(a["gate_bits"]), bool(a["gate_signed"]))


def _lut(g, node, env, cfg):
    """LEAKY_RELU; LOGISTIC / HARD_SWISH / LOGISTIC + MUL (SiLU) where ``export.tflite.prepare_graph`` chose the
    builtins (``attrs['tflite_op']``); else the IntGraph's own table (GATHER in the file)."""
    qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
    x, clamp, op = env[node.inputs[0]], _clamp(node, qy), node.attrs.get("tflite_op")
    if node.attrs.get("fn") == "leaky_relu":
        return tflite_ops.leaky_relu(x, qx.scale, qx.zero_point, qy.scale, qy.zero_point, node.attrs["alpha"], *clamp)
    if op == "HARD_SWISH":
        return tflite_ops.hard_swish(x, qx.scale, qx.zero_point, qy.scale, qy.zero_point, *clamp)
    if op in ("LOGISTIC", "LOGISTIC_MUL"):
        sig = tflite_ops.logistic(x, qx.scale, qx.zero_point)
        if op == "LOGISTIC":
            return np.clip(_requant_to(sig, LOGISTIC_Q, qy), *clamp)
        qg = gate_qparams(node)
        gate = _requant_to(sig, LOGISTIC_Q, qg)
        return tflite_ops.mul(x, qx.scale, qx.zero_point, gate, qg.scale, qg.zero_point, qy.scale, qy.zero_point,
                              *clamp)
    return np.clip(ops.LUT(x, node.arrays["table"], qx.qmin), *clamp)


OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "QLinearConv": lambda g, n, env, cfg: _weighted(g, n, env, cfg, conv=True),
    "QGemm": lambda g, n, env, cfg: _weighted(g, n, env, cfg, conv=False),
    "QLinearAdd": _binary(tflite_ops.add),
    "QLinearMul": _binary(tflite_ops.mul),
    "QLinearConcat": _concat,
    "QLinearAveragePool": _average_pool,
    "QLinearGlobalAveragePool": _global_average_pool,
    "QLinearRelu": _relu,
    "LUT": _lut,
}
