"""Fixed-point requantization multipliers (pure Python + numpy, no torch).

Lives apart from ``primitives.py`` (which re-exports it) so the torch-free parts of edgeslim, the ONNX
importer and the integer engine, use the same formula as the lowering.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["quantize_multiplier", "multiplier_arrays"]


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Represent a positive real multiplier as ``m0 * 2**-shift`` with a 31-bit ``m0`` (gemmlowp / TFLite).

    ``m0`` is in [2**30, 2**31) so it keeps 31 significant bits; ``shift`` may be negative
    (a left shift) for multipliers >= 1.

    Example:
        >>> quantize_multiplier(0.5)
        (1073741824, 31)
    """
    if not real > 0 or not math.isfinite(real):
        raise ValueError(f"requantization multiplier must be positive and finite, got {real}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * (1 << 31))
    if m0 == 1 << 31:
        m0 //= 2
        exponent += 1
    return m0, 31 - exponent


def multiplier_arrays(multiplier: np.ndarray) -> dict[str, np.ndarray]:
    """The IntGraph arrays of a requantizing node: the real multipliers and their ``m0`` / ``shift``."""
    multiplier = np.asarray(multiplier, dtype=np.float64).reshape(-1)
    pairs = [quantize_multiplier(float(m)) for m in multiplier]
    return {"multiplier": multiplier,
            "m0": np.array([m for m, _ in pairs], dtype=np.int64),
            "shift": np.array([s for _, s in pairs], dtype=np.int64)}
