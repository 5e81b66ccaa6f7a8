"""Deployment targets as data: which operations a device runs in integer / half precision, which bit widths,
which scale rule, how wide its accumulator is.

Every lightweighting step checks the target (the TTA guideline: "check the requirement after each step"); operations the
target cannot run in integer stay FP32 with quantize / dequantize around them (a float island of a
``MixedPlan``), and the report lists them, as the TTA guideline notes for transposed convolutions on its NPU.

Presets (``TARGETS``); a target file is JSON with the same fields::

    {"name": "my-npu", "int_ops": ["conv", "linear", "add", "relu", "maxpool"], "bits": [8],
     "scale": "pow2", "accumulator_bits": 32, "fp16": false, "int8": true, "packed_weights": false}

``weight_range``: ``full`` (8-bit weights on the 8-bit grid: ARM, x86 with VNNI, NPUs, microcontrollers),
``reduced`` (the 7-bit grid, for onnxruntime on x86 CPUs with AVX2 and no VNNI, whose fast int8 kernels
saturate otherwise: ``PTQConfig.weight_range``) or ``auto`` (this machine's CPU decides; ``cpu-int8``).

``packed_weights``: the target's weight format stores sub-8-bit weights packed (two 4-bit weights a byte, as
CMSIS-NN's int4 kernels); without it they sit in int8 containers (the ONNX QDQ file), so fewer bits save nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import fx

from .config import WEIGHT_RANGES, MixedPlan, PTQConfig
from .errors import EdgeslimError
from .graph import ops
from .intgraph import LUT_ACTIVATIONS

__all__ = ["Target", "TARGETS", "OP_KINDS", "GRAPH_KINDS", "COMMON_INT8", "CPU_INT_OPS", "op_kind", "load_target"]

# ``graph.ops.kind`` -> the kind a target lists; ``conv`` is split into conv / depthwise and ``lut`` into its
# activation (``intgraph.LUT_ACTIVATIONS`` names) by ``op_kind``
GRAPH_KINDS: dict[str, str] = {"conv": "conv", "linear": "linear", "add": "add", "mul": "mul", "cat": "concat",
                               "act": "relu", "avgpool": "avgpool", "softmax": "softmax"}
# the operation kinds a target can list (``graph.ops.kind`` names, with activations and pooling split by name)
OP_KINDS = ("conv", "depthwise", "conv_transpose", "linear", "add", "mul", "concat", "relu", "avgpool", "maxpool",
            "resize", *LUT_ACTIVATIONS, "softmax")
COMMON_INT8 = ("conv", "depthwise", "linear", "add", "mul", "concat", "relu", "avgpool", "maxpool", "resize")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(t: "Target") -> None:
    """Field types first (a target may come from a JSON file): integer bits, a list of op names, booleans."""
    if not isinstance(t.name, str) or not t.name.strip():
        raise EdgeslimError(f"target name {t.name!r} is not a non-empty string: name the target")
    if isinstance(t.bits, (str, bytes)) or not isinstance(t.bits, (list, tuple)) or not t.bits \
            or not all(_is_int(b) and 2 <= b <= 16 for b in t.bits):
        raise EdgeslimError(f"target {t.name}: bits {t.bits!r} must be a non-empty list of integers 2..16, e.g. [8]")
    if isinstance(t.int_ops, (str, bytes)) or not isinstance(t.int_ops, (list, tuple)) \
            or not all(isinstance(o, str) for o in t.int_ops):
        raise EdgeslimError(f"target {t.name}: int_ops {t.int_ops!r} must be a list of op kinds, e.g. "
                            '["conv", "add", "relu"]')
    if not _is_int(t.accumulator_bits):
        raise EdgeslimError(f"target {t.name}: accumulator_bits {t.accumulator_bits!r} must be the integer 16 or 32")
    if not isinstance(t.scale, str):
        raise EdgeslimError(f"target {t.name}: scale {t.scale!r} must be \"float\" or \"pow2\"")
    if t.weight_range not in WEIGHT_RANGES:
        raise EdgeslimError(f"target {t.name}: weight_range {t.weight_range!r} must be one of {', '.join(WEIGHT_RANGES)}")
    for flag in ("fp16", "int8", "packed_weights"):
        if not isinstance(getattr(t, flag), bool):
            raise EdgeslimError(f"target {t.name}: {flag} {getattr(t, flag)!r} must be true or false")


@dataclass(frozen=True)
class Target:
    name: str
    int_ops: tuple[str, ...] = COMMON_INT8  # what runs as integer kernels
    bits: tuple[int, ...] = (8,)  # integer weight / activation widths the target computes with
    scale: str = "float"  # "float" (fixed-point multipliers) or "pow2" (shift-only requantization)
    accumulator_bits: int = 32
    fp16: bool = False  # has half-precision arithmetic (not just storage)
    int8: bool = True  # has integer kernels at all
    packed_weights: bool = False  # stores sub-8-bit weights packed (k bits each) instead of in int8 containers
    weight_range: str = "full"  # "reduced": 8-bit weights on the 7-bit grid (x86 without VNNI); "auto": this CPU

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "int_ops", tuple(self.int_ops))
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        unknown = [o for o in self.int_ops if o not in OP_KINDS]
        if unknown:
            raise EdgeslimError(f"target {self.name}: unknown op kind(s) {', '.join(unknown)}; known: {', '.join(OP_KINDS)}")
        if self.scale not in ("float", "pow2"):
            raise EdgeslimError(f"target {self.name}: scale {self.scale!r} is not float or pow2")
        if self.accumulator_bits not in (16, 32):
            raise EdgeslimError(f"target {self.name}: accumulator_bits {self.accumulator_bits} is not 16 or 32")
        if not self.int8 and not self.fp16:
            raise EdgeslimError(f"target {self.name}: neither int8 nor fp16: nothing to deploy with")

    def to_dict(self) -> dict:
        return asdict(self)

    def ptq_config(self, base: PTQConfig | None = None) -> PTQConfig:
        """The PTQ settings this target imposes on ``base`` (its bits and scale rule)."""
        base = base or PTQConfig()
        bits = 8 if 8 in self.bits else max(self.bits)
        kw = {f.name: getattr(base, f.name) for f in fields(base)}
        kw.update(w_bits=bits, a_bits=bits, scale="pow2" if self.scale == "pow2" else base.scale,
                  weight_range=self.weight_range)
        return PTQConfig(**kw)

    def unsupported(self, gm: fx.GraphModule) -> dict[str, str]:
        """Plan names of the quantizable ops this target cannot run in integer, with their kind."""
        from .algorithms import ptq

        found = {}
        for node in gm.graph.nodes:
            kind = op_kind(gm, node)
            if kind is not None and kind not in self.int_ops:
                found[ptq.op_name(gm, node)] = kind
        return found

    def plan(self, gm: fx.GraphModule) -> MixedPlan | None:
        """A plan keeping every op the target cannot run in integer at FP32 (None when it runs them all)."""
        from .algorithms import ptq

        names = set(ptq.plan_names(gm))
        keep = [n for n in self.unsupported(gm) if n in names]
        return MixedPlan(tuple((n, "fp32") for n in keep)) if keep else None


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The target-facing kind of an fx node (``None`` for placeholders, quantizers, data movement, ...)."""
    k = ops.kind(gm, node)
    mod = ops.module(gm, node)
    if k == "conv":
        return "depthwise" if ops.is_depthwise(mod) else "conv"
    if k == "lut":
        return ops.lut_name(gm, node)[0]
    if k in GRAPH_KINDS:
        return GRAPH_KINDS[k]
    if type(mod).__name__ == "ConvTranspose2d":
        return "conv_transpose"
    return None


CPU_INT_OPS = (*COMMON_INT8, *LUT_ACTIVATIONS, "softmax")  # what onnxruntime runs as integer kernels (or exact tables)
TARGETS: dict[str, Target] = {
    "cpu-int8": Target("cpu-int8", int_ops=CPU_INT_OPS, weight_range="auto"),  # onnxruntime on this machine's CPU
    "cpu-int8-vnni": Target("cpu-int8-vnni", int_ops=CPU_INT_OPS),  # onnxruntime on ARM or x86 with VNNI
    "cpu-int8-avx2": Target("cpu-int8-avx2", int_ops=CPU_INT_OPS, weight_range="reduced"),  # x86, AVX2, no VNNI
    "vta": Target("vta", int_ops=("conv", "add", "relu", "maxpool", "linear"), scale="pow2"),  # TVM-VTA's GEMM core
    "mcu-int8": Target("mcu-int8", int_ops=(*COMMON_INT8, "sigmoid", "tanh", "softmax")),  # CMSIS-NN-like kernels
    # CMSIS-NN-like kernels that also read packed int4 weights (two a byte)
    "mcu-w4": Target("mcu-w4", int_ops=(*COMMON_INT8, "sigmoid", "tanh", "softmax"), bits=(4, 8), packed_weights=True),
    "fp16-gpu": Target("fp16-gpu", int_ops=(), fp16=True, int8=False),
}


def load_target(spec: str) -> Target:
    """A preset name (``cpu-int8``, ``cpu-int8-vnni``, ``cpu-int8-avx2``, ``vta``, ``mcu-int8``, ``mcu-w4``,
    ``fp16-gpu``) or a JSON target file."""
    if spec in TARGETS:
        return TARGETS[spec]
    p = Path(spec)
    if not p.exists():
        raise EdgeslimError(f"unknown target {spec!r}: use one of {', '.join(TARGETS)} or a JSON target file")
    from .config import load_json

    data = load_json(p, "target file", "fix it (a JSON object with name, bits, int_ops, ...)")
    if not isinstance(data, dict):
        raise EdgeslimError(f"target file {p} holds a JSON {type(data).__name__}, not an object: write "
                            '{"name": "...", "bits": [8], ...}')
    known = {f.name for f in fields(Target)}
    extra = sorted(set(data) - known)
    if extra or "name" not in data:
        raise EdgeslimError(f"target file {p}: unknown field(s) {', '.join(extra) or '-'} or no name; fields: "
                            f"{', '.join(sorted(known))}")
    return Target(**data)
