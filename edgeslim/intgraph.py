"""The integer graph and its op vocabulary: the contract between lowering, the importers, the integer engine
and the exporters.

Plain dataclasses holding numpy arrays; no torch. ``OP_CATEGORIES`` is the one list of node ops and what kind
of computation each is. Node ``op`` names follow ONNX / onnxruntime (QuantizeLinear, QLinearConv,
QLinearConvTranspose, QLinearAdd, QLinearMul, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool, QGemm,
QLinearRelu, MaxPool, Slice, Pad, Flatten, Reshape, Transpose, Gather, Resize, DequantizeLinear, and the float ops
of mixed precision) and their semantics, plus ``LUT``: an elementwise activation on codes (``arrays['table']``, one
output code per input code from ``qmin``; ``attrs['fn']`` names the function), which the ONNX exporter writes as
DequantizeLinear -> the function -> QuantizeLinear, or as a Gather on the codes (``activations="table"``):

* tensors between nodes are integer codes with a ``QParams`` (scale, zero point, bits, signedness);
* a requantizing node (``QLinear*``, ``QGemm``) maps its int32 accumulator to the output codes with
  ``multiplier = in_scale * w_scale / out_scale`` (per output channel for per-channel weights). Both the
  real multiplier and its fixed-point form ``m0 * 2**-shift`` (``primitives.quantize_multiplier``)
  are stored; with power-of-two scales ``m0`` is exactly 2**30 and the requantization is a shift.
  Rounding (``engine.ops.requantize``): ``float`` mode = onnxruntime's float32 multiply then round half
  to even; ``fixed`` = ``(acc * m0 + 2**(shift-1)) >> shift`` (one rounding, half up; gemmlowp rounds
  twice); ``shift`` = ``(acc + 2**(s-1)) >> s`` for power-of-two multipliers;
* a fused activation is a clamp of the output codes: ``attrs['clamp'] = (lo, hi)``;
* ``FloatIsland``: an op with no integer form, kept in float; ``arrays['onnx']`` holds it as a serialized ONNX
  model (inputs named as the node's inputs, one output named as its output; ``graph.island``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


__all__ = ["OP_CATEGORIES", "CATEGORIES", "ops_in", "DATA_MOVEMENT", "ACTIVATION_OPS", "FLOAT_OPS", "LUT_ACTIVATIONS",
           "QParams", "IntNode", "IntGraph"]

# Every IntGraph op and its category, one flat table (as ``graph.ops`` names fx nodes). The engine
# (``engine.run`` / ``engine.float_ops``), the ONNX exporter (``export.onnx_qdq.EMITTERS``) and the tests read it:
# an op is added here first. Categories:
# * ``boundary``: float <-> codes (QuantizeLinear, DequantizeLinear);
# * ``weighted``: integer weights, an int32 accumulator requantized to the output codes (or dequantized:
#   ``float_output``);
# * ``requantizing``: integer elementwise / pooling ops whose output has its own ``QParams``;
# * ``table``: ``LUT``, an activation on codes (one output code per input code);
# * ``data_movement``: ops whose output values are input values; on codes they keep the input's ``QParams``, on a
#   float tensor of a mixed-precision graph they run in float;
# * ``float``: the float form of an integer op (mixed precision), ``Cast`` to / from FP16 and ``Softmax``;
# * ``float_activation``: a float elementwise activation (ONNX op names; ``LUT_ACTIVATIONS``);
# * ``float_island``: any other op, kept as a serialized ONNX model (``arrays['onnx']``).
OP_CATEGORIES: dict[str, str] = {
    "QuantizeLinear": "boundary",
    "DequantizeLinear": "boundary",
    "QLinearConv": "weighted",
    "QLinearConvTranspose": "weighted",
    "QGemm": "weighted",
    "QLinearAdd": "requantizing",
    "QLinearMul": "requantizing",
    "QLinearConcat": "requantizing",
    "QLinearRelu": "requantizing",
    "QLinearGlobalAveragePool": "requantizing",
    "QLinearAveragePool": "requantizing",
    "LUT": "table",
    "MaxPool": "data_movement",
    "Slice": "data_movement",
    "Pad": "data_movement",
    "Flatten": "data_movement",
    "Identity": "data_movement",
    "Reshape": "data_movement",
    "Transpose": "data_movement",
    "Gather": "data_movement",
    "Resize": "data_movement",
    "Conv": "float",
    "Gemm": "float",
    "Add": "float",
    "Mul": "float",
    "Concat": "float",
    "Relu": "float",
    "Clip": "float",
    "GlobalAveragePool": "float",
    "ReduceMean": "float",
    "AveragePool": "float",
    "Cast": "float",
    "Softmax": "float",
    "Silu": "float_activation",
    "Sigmoid": "float_activation",
    "HardSwish": "float_activation",
    "HardSigmoid": "float_activation",
    "LeakyRelu": "float_activation",
    "Tanh": "float_activation",
    "Gelu": "float_activation",
    "Mish": "float_activation",
    "Elu": "float_activation",
    "FloatIsland": "float_island",
}
CATEGORIES = ("boundary", "weighted", "requantizing", "table", "data_movement", "float", "float_activation",
              "float_island")


def ops_in(*categories: str) -> tuple[str, ...]:
    """The ops of the given categories, in table order."""
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown op categories {unknown}: use {CATEGORIES}")
    return tuple(op for op, c in OP_CATEGORIES.items() if c in categories)


DATA_MOVEMENT = ops_in("data_movement")
ACTIVATION_OPS = ops_in("float_activation")
FLOAT_OPS = ops_in("float", "float_activation", "float_island")  # ops that compute in float (not data movement)
# a LUT's ``attrs['fn']`` -> the float activation op computing the same function (``graph.ops.LUT_FUNCTIONS`` names)
LUT_ACTIVATIONS: dict[str, str] = {"silu": "Silu", "sigmoid": "Sigmoid", "hardswish": "HardSwish",
                                   "hardsigmoid": "HardSigmoid", "leaky_relu": "LeakyRelu", "tanh": "Tanh",
                                   "gelu": "Gelu", "mish": "Mish", "elu": "Elu"}


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits, "signed": self.signed}


@dataclass
class IntNode:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class IntGraph:
    input_name: str
    input_shape: tuple[int, ...]  # C, H, W (the batch dimension is dynamic)
    output_names: list[str]
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)  # without the batch dimension
    nodes: list[IntNode] = field(default_factory=list)
    qparams: dict[str, QParams] = field(default_factory=dict)  # integer tensor name -> its quantization
    float16: set[str] = field(default_factory=set)  # float tensors stored as FP16 (mixed precision)

    def weight_bytes(self) -> int:
        """Bytes of stored parameters at their real bit widths (weights packed, int32 biases, FP16/FP32 values)."""
        return sum(self.layer_bytes(n) for n in self.nodes)

    @staticmethod
    def layer_bytes(node: IntNode) -> int:
        a, total = node.arrays, 0
        if "w" in a:
            total += (a["w"].size * node.attrs["w_bits"] + 7) // 8
        if "bias" in a:
            total += a["bias"].size * 4
        for key in ("w_float", "b_float"):
            if key in a:
                total += a[key].nbytes
        return total

    def layers(self) -> list[IntNode]:
        """Nodes with integer weights (the ones with scales and requantization)."""
        return [n for n in self.nodes if "w" in n.arrays]

    def float_islands(self) -> list[dict]:
        """Ops that run in float (FP32 / FP16) between integer tensors: name, ONNX op, and what it computes."""
        return [{"name": n.name, "op": n.op, "fn": n.attrs.get("fn", n.op)} for n in self.nodes
                if n.op in FLOAT_OPS and n.op not in ("Cast", "Identity")]

    def is_mixed(self) -> bool:
        """True when part of the graph runs in float (FP16 / FP32 islands)."""
        return any(n.op in FLOAT_OPS for n in self.nodes)
