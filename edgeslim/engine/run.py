"""Run an ``IntGraph`` with the numpy integer engine.

    outputs = run(g, x)                       # {output name: float32 array}
    everything = run(g, x, return_codes=True) # also every intermediate integer tensor, by name

``requant`` picks the requantization of QLinearConv / QGemm (``ops.requantize``): ``"float"`` mirrors
onnxruntime (its float32 multiplier ``x_scale * w_scale / y_scale``), ``"fixed"`` is the integer-only
``m0 * 2**-shift``, ``"shift"`` needs power-of-two multipliers, ``"tflite"`` computes every op as the
LiteRT / TFLM int8 kernels do (``tflite_run``; run it on ``export.tflite.prepare_graph(g)``).
``accumulator_bits`` / ``overflow`` set the conv / GEMM accumulator register; ``stats`` (``OverflowStats``) collects overflow counts.

One kernel per IntGraph op (``intgraph.OP_CATEGORIES``): ``OPS`` here for ops on codes, ``float_ops.OPS`` for
``intgraph.FLOAT_OPS`` (and ``float_ops.data_movement`` for data movement on a float tensor).
"""

from __future__ import annotations

import numpy as np

from ..intgraph import DATA_MOVEMENT, FLOAT_OPS, IntGraph, IntNode, QParams
from . import float_ops, ops, tflite_run
from .overflow import OverflowStats

__all__ = ["run", "OPS"]


def _clamp(node: IntNode, q: QParams) -> tuple[int, int]:
    lo, hi = node.attrs.get("clamp") or (q.qmin, q.qmax)
    return max(int(lo), q.qmin), min(int(hi), q.qmax)


def _weighted_kwargs(g: IntGraph, node: IntNode, requant: str) -> dict:
    a = node.arrays
    kw = {"m0": a.get("m0"), "shift": a.get("shift"), "multiplier": a.get("multiplier")}
    if not node.attrs.get("float_output"):
        in_q, out_q = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
        if requant == "float":
            kw["multiplier"] = ops.ort_multiplier(in_q.scale, a["w_scale"], out_q.scale)
        kw.update(y_zero_point=out_q.zero_point, clamp=_clamp(node, out_q))
    return kw


def _conv(g, node, env, cfg):
    a, at = node.arrays, node.attrs
    in_q = g.qparams[node.inputs[0]]
    y, _ = ops.QLinearConv(env[node.inputs[0]], in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"),
                           strides=at["strides"], pads=at["pads"], dilations=at["dilations"], group=at["group"],
                           requant=cfg["requant"], accumulator_bits=cfg["accumulator_bits"],
                           overflow=cfg["overflow"], observer=_observer(cfg, node),
                           shift_add=cfg.get("shift_add", False), count_events=False,
                           **_weighted_kwargs(g, node, cfg["requant"]))
    return y


def _gemm(g, node, env, cfg):
    a, at = node.arrays, node.attrs
    in_q = g.qparams[node.inputs[0]]
    x = env[node.inputs[0]]
    x = x.reshape(x.shape[0], -1)
    y, _ = ops.QGemm(x, in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"), x_scale=in_q.scale,
                     w_scale=a["w_scale"], float_output=bool(at.get("float_output")), requant=cfg["requant"],
                     accumulator_bits=cfg["accumulator_bits"], overflow=cfg["overflow"],
                     observer=_observer(cfg, node), **_weighted_kwargs(g, node, cfg["requant"]))
    return y


def _observer(cfg, node):
    stats = cfg["stats"]
    return None if stats is None else stats.observer(node.name, node.arrays["w"].shape[0])


def _add(g, node, env, cfg):
    qa, qb, qy = (g.qparams[n] for n in (*node.inputs[:2], node.outputs[0]))
    return ops.QLinearAdd(env[node.inputs[0]], qa.scale, qa.zero_point, env[node.inputs[1]], qb.scale, qb.zero_point,
                          qy.scale, qy.zero_point, _clamp(node, qy), requant=cfg["requant"],
                          offsets=[_offset(q) for q in (qa, qb, qy)])


def _mul(g, node, env, cfg):
    qa, qb, qy = (g.qparams[n] for n in (*node.inputs[:2], node.outputs[0]))
    return ops.QLinearMul(env[node.inputs[0]], qa.scale, qa.zero_point, env[node.inputs[1]], qb.scale, qb.zero_point,
                          qy.scale, qy.zero_point, _clamp(node, qy), requant=cfg["requant"],
                          offsets=[_offset(q) for q in (qa, qb, qy)])


def _offset(q: QParams) -> int:
    """onnxruntime stores signed 8-bit codes as uint8 code + 128 (``export.onnx_qdq._container``)."""
    return 128 if q.signed and q.bits <= 8 else 0


def _concat(g, node, env, cfg):
    qy = g.qparams[node.outputs[0]]
    qps = [(g.qparams[n].scale, g.qparams[n].zero_point) for n in node.inputs]
    return ops.QLinearConcat([env[n] for n in node.inputs], qps, qy.scale, qy.zero_point, _clamp(node, qy),
                             axis=node.attrs.get("axis", 1))


def _unary_q(fn, **extra):
    def call(g, node, env, cfg):
        qx, qy = g.qparams[node.inputs[0]], g.qparams[node.outputs[0]]
        kwargs = {k: (node.attrs[v] if isinstance(v, str) else v) for k, v in extra.items()}  # str: an attr name
        return fn(env[node.inputs[0]], qx.scale, qx.zero_point, qy.scale, qy.zero_point, _clamp(node, qy), **kwargs)
    return call


def _quantize(g, node, env, cfg):
    q = g.qparams[node.outputs[0]]
    lo, hi = _clamp(node, q)
    return ops.QuantizeLinear(env[node.inputs[0]], q.scale, q.zero_point, lo, hi)


def _dequantize(g, node, env, cfg):
    q = g.qparams[node.inputs[0]]
    return ops.DequantizeLinear(env[node.inputs[0]], q.scale, q.zero_point)


def _pad(g, node, env, cfg):
    return ops.Pad(env[node.inputs[0]], node.attrs["pads"], g.qparams[node.inputs[0]].zero_point)


def _conv_transpose(g, node, env, cfg):
    """QLinearConvTranspose (exact 32-bit accumulator; the overflow stats observer does not see it)."""
    a, at = node.arrays, node.attrs
    in_q = g.qparams[node.inputs[0]]
    y, _ = ops.QLinearConvTranspose(env[node.inputs[0]], in_q.zero_point, a["w"], a["w_zero_point"], a.get("bias"),
                                    strides=at["strides"], pads=at["pads"], dilations=at["dilations"],
                                    group=at["group"], output_padding=at.get("output_padding", (0, 0)),
                                    requant=cfg["requant"], accumulator_bits=cfg["accumulator_bits"],
                                    overflow=cfg["overflow"], **_weighted_kwargs(g, node, cfg["requant"]))
    return y


def _resize(g, node, env, cfg):
    """Nearest Resize of codes; the batch axis is kept (``sizes[0]`` is the batch of the exported model)."""
    x, at = env[node.inputs[0]], node.attrs
    sizes = at.get("sizes")
    if sizes is not None:
        sizes = [x.shape[0], *list(sizes)[1:]]
    y = ops.Resize(x, scales=at.get("scales"), sizes=sizes,
                   coordinate_transformation_mode=at.get("coordinate_transformation_mode", "half_pixel"),
                   nearest_mode=at.get("nearest_mode", "round_prefer_floor"))
    if at.get("clamp") is not None:  # an integer Clip folded onto it
        y = np.clip(y, *_clamp(node, g.qparams[node.outputs[0]]))
    return y


OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "QLinearConv": _conv,
    "QLinearConvTranspose": _conv_transpose,
    "QGemm": _gemm,
    "QLinearAdd": _add,
    "QLinearMul": _mul,
    "QLinearConcat": _concat,
    "QLinearRelu": _unary_q(ops.QLinearRelu),
    "QLinearGlobalAveragePool": lambda g, n, env, cfg: _unary_q(
        ops.QLinearGlobalAveragePool, keepdims=bool(n.attrs.get("keepdims", True)))(g, n, env, cfg),
    "QLinearAveragePool": lambda g, n, env, cfg: _unary_q(
        ops.QLinearAveragePool, kernel_shape="kernel_shape", strides="strides",
        offset=_offset(g.qparams[n.outputs[0]]))(g, n, env, cfg),
    "MaxPool": lambda g, n, env, cfg: ops.MaxPool(env[n.inputs[0]], n.attrs["kernel_shape"], n.attrs["strides"],
                                                  n.attrs.get("pads", (0, 0, 0, 0))),
    "Slice": lambda g, n, env, cfg: ops.Slice(env[n.inputs[0]], n.attrs["starts"], n.attrs["ends"], n.attrs["axes"],
                                              n.attrs.get("steps")),
    "Pad": _pad,
    "Flatten": lambda g, n, env, cfg: ops.Flatten(env[n.inputs[0]], n.attrs.get("axis", 1)),
    "Identity": lambda g, n, env, cfg: ops.Identity(env[n.inputs[0]]),
    "Reshape": lambda g, n, env, cfg: ops.Reshape(env[n.inputs[0]], n.attrs["shape"]),
    "Transpose": lambda g, n, env, cfg: ops.Transpose(env[n.inputs[0]], n.attrs["perm"]),
    "Gather": lambda g, n, env, cfg: ops.Gather(env[n.inputs[0]], n.attrs["axis"], n.attrs["index"]),
    "Resize": _resize,
    "LUT": lambda g, n, env, cfg: np.clip(ops.LUT(env[n.inputs[0]], n.arrays["table"], g.qparams[n.inputs[0]].qmin),
                                          *_clamp(n, g.qparams[n.outputs[0]])),
}


def _kernel(g: IntGraph, node: IntNode):
    """The integer kernel, or the float one for a float island of a mixed-precision graph (``intgraph.FLOAT_OPS``,
    and data movement whose output is a float tensor)."""
    if node.op in FLOAT_OPS:
        return float_ops.OPS.get(node.op)
    if node.op in DATA_MOVEMENT and node.outputs[0] not in g.qparams:
        return float_ops.data_movement
    return OPS.get(node.op)


def run(g: IntGraph, x: np.ndarray, *, requant: str = "float", accumulator_bits: int = 32,
        overflow: str = "saturate", stats: OverflowStats | None = None, batch_size: int = 256,
        return_codes: bool = False, shift_add: bool = False) -> dict[str, np.ndarray]:
    """Execute ``g`` on float input ``x`` (N, C, H, W) batch by batch.

    Returns ``{output name: array}`` (float32 for DequantizeLinear / float-output QGemm outputs, int64
    codes otherwise); with ``return_codes`` the dict also holds every intermediate tensor by name
    (integer codes in the natural, signed-or-unsigned form of its ``QParams``). ``shift_add`` runs the
    convolutions without multiplications (``ops.conv_acc_shift``: PoT / APoT weights as shifts and adds).
    """
    if requant not in ops.ACC_MODES:
        raise ValueError(f"unknown requantization mode {requant!r}: use one of {ops.ACC_MODES}")
    if stats is not None:
        stats.accumulator_bits = accumulator_bits
    cfg = {"requant": requant, "accumulator_bits": accumulator_bits, "overflow": overflow, "stats": stats,
           "shift_add": shift_add}
    x = np.asarray(x, dtype=np.float32)
    keep = None
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch_size):
        env = {g.input_name: x[i:i + batch_size]}
        for node in g.nodes:
            fn = (requant == "tflite" and tflite_run.OPS.get(node.op)) or _kernel(g, node)
            if fn is None:
                raise ValueError(f"engine has no kernel for IntGraph op {node.op} ({node.name})")
            result = fn(g, node, env, cfg)
            if len(node.outputs) > 1:  # a float island with several outputs (Split, ...)
                env.update(zip(node.outputs, result))
            else:
                env[node.outputs[0]] = result
        keep = list(env) if return_codes else g.output_names
        for name in keep:
            chunks.setdefault(name, []).append(env[name])
    if keep is None:
        return {}
    return {name: np.concatenate(chunks[name]) for name in keep if name != g.input_name or return_codes}
