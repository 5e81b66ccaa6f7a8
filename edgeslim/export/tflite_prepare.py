"""Graph preparation for the TFLite writer (``export.tflite``): the checks of what TFLite can hold, int8 logits
for float outputs, activation islands folded into tables or TFLite's builtins (LOGISTIC, HARD_SWISH, LOGISTIC +
MUL for SiLU), and every tensor's shape at batch 1. ``prepare_graph`` gives the TFLite-representable copy that both
the writer and the engine's ``requant="tflite"`` mode run."""

from __future__ import annotations

import copy

import numpy as np

from ..engine import tflite_ops
from ..errors import EdgeslimError
from ..intgraph import IntGraph, IntNode, QParams
from ..quant.fixed_point import multiplier_arrays

__all__ = ["check_graph", "ACTIVATIONS", "ELEMENTWISE_ISLANDS", "prepare_graph", "logit_qparams", "tensor_shapes"]


def check_graph(g: IntGraph) -> None:
    """Refuse what TFLite's int8 kernels cannot represent, naming the option that avoids it."""
    for name, q in g.qparams.items():
        if q.bits > 8:
            raise EdgeslimError(f"tensor {name} has {q.bits}-bit activations: TFLite int8 export needs --a-bits 8 "
                                "or fewer")
    for n in g.nodes:
        if "w" not in n.arrays:
            continue
        if n.attrs.get("w_bits", 8) > 8:
            raise EdgeslimError(f"layer {n.name} has {n.attrs['w_bits']}-bit weights: TFLite int8 export needs "
                                "--w-bits 8 or fewer")
        if np.any(np.asarray(n.arrays["w_zero_point"]) != 0):
            raise EdgeslimError(f"layer {n.name} has asymmetric weights (non-zero zero points): TFLite int8 "
                                "export needs --w-scheme symmetric")


def _logit_qparams(values: np.ndarray) -> QParams:
    """Asymmetric int8 parameters covering ``values`` (and 0), as the calibrators choose them."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(-128 - round(lo / scale), -128, 127))
    return QParams(float(np.float32(scale)), zp, 8, True)


def _logit_bound(g: IntGraph, node: IntNode) -> np.ndarray:
    """The largest |real output| a float-output layer can produce for any input code (no data needed)."""
    q = g.qparams[node.inputs[0]]
    a = node.arrays
    dx = max(abs(q.qmin - q.zero_point), abs(q.qmax - q.zero_point))
    acc = np.abs(a["w"].astype(np.int64)).reshape(a["w"].shape[0], -1).sum(axis=1) * dx
    if "bias" in a:
        acc = acc + np.abs(np.asarray(a["bias"], np.int64).reshape(-1))
    return np.array([-1.0, 1.0]) * float((acc * np.float64(q.scale) * a["w_scale"].astype(np.float64)).max())


ACTIVATIONS = ("table", "builtin")

# float islands that compute one output value from one input value (ONNX op types): between an int8 input and a
# QuantizeLinear they are a 256-entry table (what import_qdq makes of the DQ -> op -> Q activations of an INT8 ONNX file)
ELEMENTWISE_ISLANDS = ("LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "Mish", "HardSigmoid", "HardSwish",
                       "Softplus", "Relu", "Clip", "Exp", "Erf", "Abs", "Neg", "Identity")


def _fold_activation_islands(g: IntGraph) -> None:
    """Each chain of elementwise float islands (``LeakyRelu`` then ``Identity``, ...) from an integer tensor to one
    QuantizeLinear becomes a ``LUT`` node: the chain evaluated on every input code and quantized as onnxruntime's
    QuantizeLinear does (half to even), i.e. what the INT8 ONNX file computes on those codes."""
    from ..engine import float_ops, ops

    users: dict[str, list[IntNode]] = {}
    for n in g.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)

    def elementwise(n: IntNode) -> bool:
        return n.op == "FloatIsland" and n.attrs.get("fn") in ELEMENTWISE_ISLANDS and len(n.inputs) == 1 \
            and len(n.outputs) == 1 and n.outputs[0] not in g.output_names

    for node in list(g.nodes):
        if not elementwise(node) or node.inputs[0] not in g.qparams:
            continue
        chain = [node]
        while len(users.get(chain[-1].outputs[0], [])) == 1 and elementwise(users[chain[-1].outputs[0]][0]):
            chain.append(users[chain[-1].outputs[0]][0])
        after = users.get(chain[-1].outputs[0], [])
        if len(after) != 1 or after[0].op != "QuantizeLinear":
            continue
        quant = after[0]
        qx, qy = g.qparams[node.inputs[0]], g.qparams[quant.outputs[0]]
        env = {node.inputs[0]: np.arange(qx.qmin, qx.qmax + 1, dtype=np.int64).reshape(1, -1, 1, 1)}
        with np.errstate(all="ignore"):  # every code, extreme ones too (exp overflows to inf: sigmoid 0 / 1)
            for n in chain:
                env[n.outputs[0]] = np.asarray(float_ops.FloatIsland(g, n, env, {}), np.float32)
        y = env[chain[-1].outputs[0]].reshape(-1)
        if y.size != qx.qmax - qx.qmin + 1:
            continue
        table = ops.QuantizeLinear(y, qy.scale, qy.zero_point, qy.qmin, qy.qmax).astype(np.int64)
        fn = "onnx_" + "_".join(n.attrs["fn"] for n in chain if n.attrs["fn"] != "Identity")
        g.nodes[g.nodes.index(quant)] = IntNode("LUT", quant.name, [node.inputs[0]], [quant.outputs[0]], {"fn": fn},
                                                {"table": table})
        for n in chain:
            g.nodes.remove(n)



def _fold_gated_silu(g: IntGraph) -> None:
    """A sigmoid table whose only reader is a QLinearMul by the table's own input (``x * Q_g(sigmoid(x))``: how
    ``import_qdq`` reads edgeslim's gated SiLU, DQ -> Sigmoid -> Q -> DQ -> Mul -> Q) becomes one ``LUT`` silu node
    with the gate's parameters: the product evaluated on every input code as the ONNX graph defines it (float32
    dequantized values, QuantizeLinear half to even), so the file holds one table (or LOGISTIC + MUL) as
    ``quantize --formats tflite`` writes it."""
    from ..engine import ops

    users: dict[str, list[IntNode]] = {}
    made = {n.outputs[0]: n for n in g.nodes}
    for n in g.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    for mul in list(g.nodes):
        if mul.op != "QLinearMul":
            continue
        for x, gate in (mul.inputs[:2], mul.inputs[1::-1]):
            lut = made.get(gate)
            if lut is None or lut.op != "LUT" or lut.attrs.get("fn") not in ("sigmoid", "onnx_Sigmoid") or \
                    lut.inputs[0] != x or len(users.get(gate, [])) != 1 or gate in g.output_names:
                continue
            qx, qg, qy = g.qparams[x], g.qparams[gate], g.qparams[mul.outputs[0]]
            codes = np.arange(qx.qmin, qx.qmax + 1, dtype=np.int64)
            lo, hi = lut.attrs.get("clamp") or (qg.qmin, qg.qmax)
            gcodes = np.clip(np.asarray(lut.arrays["table"], np.int64), max(lo, qg.qmin), min(hi, qg.qmax))
            y = ops.DequantizeLinear(codes, qx.scale, qx.zero_point) * \
                ops.DequantizeLinear(gcodes, qg.scale, qg.zero_point)
            table = ops.QuantizeLinear(y, qy.scale, qy.zero_point, qy.qmin, qy.qmax).astype(np.int64)
            attrs = {"fn": "silu", "gate_scale": qg.scale, "gate_zero_point": qg.zero_point, "gate_bits": qg.bits,
                     "gate_signed": qg.signed}
            if mul.attrs.get("clamp") is not None:
                attrs["clamp"] = mul.attrs["clamp"]
            g.nodes[g.nodes.index(mul)] = IntNode("LUT", mul.name, [x], list(mul.outputs), attrs, {"table": table})
            g.nodes.remove(lut)
            g.qparams.pop(gate, None)
            break


def _choose_builtins(g: IntGraph) -> None:
    """``activations="builtin"``: sigmoid -> LOGISTIC, hard-swish -> HARD_SWISH, gated SiLU -> LOGISTIC + MUL
    (``attrs['tflite_op']``, read by the exporter and the engine) where TFLite accepts the scales."""
    for n in g.nodes:
        if n.op != "LUT":
            continue
        fn, qx, qy = n.attrs.get("fn"), g.qparams[n.inputs[0]], g.qparams[n.outputs[0]]
        if fn == "sigmoid":
            n.attrs["tflite_op"] = "LOGISTIC"
        elif fn == "hardswish" and tflite_ops.hard_swish_params(qx.scale, qy.scale) is not None:
            n.attrs["tflite_op"] = "HARD_SWISH"
        elif fn == "silu" and n.attrs.get("gate_bits") == 8:
            n.attrs["tflite_op"] = "LOGISTIC_MUL"


def prepare_graph(g: IntGraph, calib: np.ndarray | None = None, activations: str = "builtin",
                  logits: list[QParams] | None = None) -> IntGraph:
    """A copy of ``g`` that TFLite can run: every float-output layer (the classifier's logits, a dequantized
    accumulator in the IntGraph) gets int8 outputs followed by DequantizeLinear, since TFLite's int8
    FULLY_CONNECTED has no float output. Their range is observed on ``calib`` (float N, C, H, W inputs; the
    engine runs them) or, without it, bounded from the weights (wider: coarser logits).

    ``activations``: ``builtin`` (default) uses LOGISTIC / HARD_SWISH / LOGISTIC + MUL (gated SiLU) where TFLite
    accepts the scales, which XNNPACK runs and NPU compilers map to their own units, at the price of TFLite's fixed
    output scale 1/256 for LOGISTIC and one more rounding than the simulation (yolov5n on COCO128: XNNPACK 2.1x
    faster than ``table``, mAP@.5:.95 0.3129 vs 0.3133; BENCHMARKS.md ``tflite-export``); ``table`` writes every LUT
    activation but leaky ReLU as its int8 table (CAST + ADD + GATHER; exactly the simulation's table), which
    XNNPACK does not delegate. The engine's ``tflite`` mode computes either exactly.

    ``logits``: the int8 parameters of the float-output layers, in graph order, as ``logit_qparams`` read them
    from a prepared graph (``edgeslim export`` rebuilds the file of a run from its recorded ones)."""
    if activations not in ACTIVATIONS:
        raise EdgeslimError(f"invalid activations {activations!r}: use one of {', '.join(ACTIVATIONS)}")
    check_graph(g)
    g = copy.deepcopy(g)
    _fold_activation_islands(g)
    _fold_gated_silu(g)
    if activations == "builtin":
        _choose_builtins(g)
    heads = [n for n in g.nodes if n.attrs.get("float_output")]
    if not heads:
        return g
    if logits is not None and len(logits) != len(heads):
        raise EdgeslimError(f"{len(logits)} recorded logit parameters for {len(heads)} float-output layers: "
                            "the run's summary.json does not belong to its model_int8.onnx")
    observed = {}
    if calib is not None and logits is None:
        from ..engine.run import run
        observed = run(g, np.asarray(calib, np.float32), requant="tflite", return_codes=True)
    for k, node in enumerate(heads):
        name = node.outputs[0]
        qy = logits[k] if logits is not None else \
            _logit_qparams(observed[name] if name in observed else _logit_bound(g, node))
        coded = f"{name}_int8"
        g.qparams[coded] = qy
        in_q = g.qparams[node.inputs[0]]
        node.arrays.update(multiplier_arrays(in_q.scale * node.arrays["w_scale"].astype(np.float64) / qy.scale))
        node.attrs.pop("float_output")
        node.attrs["clamp"] = (qy.qmin, qy.qmax)
        node.attrs["tflite_logits"] = True
        node.outputs = [coded]
        node.name = coded
        g.nodes.insert(g.nodes.index(node) + 1, IntNode("DequantizeLinear", name, [coded], [name]))
    return g


def logit_qparams(tg: IntGraph) -> list[QParams]:
    """The int8 parameters ``prepare_graph`` chose for the float-output layers of ``g`` (graph order)."""
    return [tg.qparams[n.outputs[0]] for n in tg.nodes if n.attrs.get("tflite_logits")]


def tensor_shapes(g: IntGraph) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape at batch 1 (NCHW, as the IntGraph computes), from one engine run on zeros."""
    from ..engine.run import run
    env = run(g, np.zeros((1, *g.input_shape), np.float32), requant="tflite", return_codes=True)
    return {k: tuple(np.shape(v)) for k, v in env.items()}
