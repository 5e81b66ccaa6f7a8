"""Layout and parameter helpers of the TFLite writer: fused-activation codes, NHWC storage of 4-D tensors,
permutations, and how an IntGraph code's parameters look in an int8 TFLite tensor (unsigned 8-bit codes move by
128)."""

from __future__ import annotations

import numpy as np

from ..intgraph import QParams

__all__ = ["ACTIVATION_CODES", "act_code", "NHWC", "layout", "inverse", "then", "same_bytes", "same_stored", "stored",
           "int8_offset"]

NHWC = (0, 2, 3, 1)  # stored = logical.transpose(NHWC) for 4-D tensors
ACTIVATION_CODES = {"NONE": 0, "RELU": 1, "RELU6": 3}  # schema.fbs ActivationFunctionType


def act_code(act: str) -> int:
    """The fused-activation code of ``act`` (NONE, RELU, RELU6)."""
    return ACTIVATION_CODES[act]


def layout(ndim: int) -> tuple[int, ...]:
    return NHWC if ndim == 4 else tuple(range(ndim))


def inverse(p) -> list[int]:
    inv = [0] * len(p)
    for i, v in enumerate(p):
        inv[v] = i
    return inv


def then(p, q) -> list[int]:
    """``a.transpose(p).transpose(q) == a.transpose(then(p, q))``."""
    return [p[i] for i in q]


def same_bytes(shape, perm) -> bool:
    """True when ``transpose(perm)`` of a tensor of ``shape`` keeps its bytes in order (only size-1 axes move)."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


def same_stored(a: QParams, b: QParams) -> bool:
    """Equal int8 parameters in the file (float32 scale, int8 zero point)."""
    return bool(np.float32(a.scale) == np.float32(b.scale)) and \
        a.zero_point - int8_offset(a) == b.zero_point - int8_offset(b)


def stored(shape) -> list[int]:
    return [int(shape[i]) for i in layout(len(shape))]


def int8_offset(q: QParams) -> int:
    """int8 code = natural code - offset (unsigned 8-bit codes move by 128)."""
    return 0 if q.signed else 128
