"""The integer graph: the contract between lowering, the ONNX exporter and (later) the integer engine.

Plain dataclasses holding numpy arrays; no torch. Node ``op`` names follow ONNX / onnxruntime
(QuantizeLinear, QLinearConv, QLinearAdd, QLinearMul, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool,
QGemm, QLinearRelu, MaxPool, Slice, Pad, Flatten, Reshape, Transpose, Gather, Resize, DequantizeLinear) and
their semantics, plus ``LUT``: an elementwise activation on codes (``arrays['table']``, one output code per input
code from ``qmin``; ``attrs['fn']`` names the function), which the exporter writes as ONNX Gather on the codes:

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


ACTIVATION_OPS = ("Silu", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "Tanh", "Gelu", "Mish", "Elu")
FLOAT_OPS = ("Conv", "Gemm", "Add", "Mul", "Concat", "Relu", "Clip", "GlobalAveragePool", "ReduceMean", "AveragePool",
             "Cast", "Softmax", "FloatIsland", *ACTIVATION_OPS)


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
