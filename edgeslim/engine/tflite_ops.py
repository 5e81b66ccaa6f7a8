"""TFLite's integer arithmetic in numpy (the engine's ``requant="tflite"`` mode).

What LiteRT's reference kernels and TensorFlow Lite for Microcontrollers compute for int8 tensors
(``tensorflow/lite/kernels/internal/common.h``, ``reference/integer_ops/*.h``, ``quantization_util.cc``):

* ``quantize_multiplier(real)`` -- ``QuantizeMultiplier(double)``: ``frexp``, a 31-bit fraction rounded half
  away from zero (``TfLiteRound``), TFLite's shift convention (positive = left shift);
* ``multiply_by_quantized_multiplier(x, m, shift)`` -- ``MultiplyByQuantizedMultiplier``: left shift, then
  ``SaturatingRoundingDoublingHighMul`` (gemmlowp, round half away from zero), then ``RoundingDivideByPOT``
  (round half away from zero): two roundings, not one (``TFLITE_SINGLE_ROUNDING`` is off by default);
* the multipliers are derived as the kernels derive them at Prepare time, from the **float32 scales stored in
  the flatbuffer**, widened to double: ``conv_multipliers`` (``PopulateConvolutionQuantizationParams``),
  ``add_params`` (``PrepareGeneralSubOp`` / ``add.cc``: left shift 20), ``mul`` (``mul.cc``), ``requantize``
  (``quantize.cc``: int8 -> int8 QUANTIZE), ``leaky_relu`` (``activations.cc``).

Integer codes are int64 arrays of the int8 values TFLite stores (signed, zero point included).
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
ADD_LEFT_SHIFT = 20  # add.cc: data->left_shift for int8 (15 for int16)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``QuantizeMultiplier(double, int32_t*, int*)``: ``real ~= m * 2**(shift - 31)``, ``m`` in [2**30, 2**31).

    ``shift`` is TFLite's: positive means a left shift. 0 gives (0, 0); a shift below -31 flushes to (0, 0);
    a shift above 30 saturates to (2**31 - 1, 30).

    >>> quantize_multiplier(0.5)
    (1073741824, 0)
    >>> quantize_multiplier(0.75)
    (1610612736, 0)
    """
    if real == 0.0:
        return 0, 0
    frac, shift = math.frexp(real)
    q = int(math.copysign(math.floor(abs(frac) * (1 << 31) + 0.5), frac))  # TfLiteRound: half away from zero
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        return (1 << 31) - 1, 30
    return q, shift


def quantize_multiplier_smaller_than_one_exp(real: float) -> tuple[int, int]:
    """``QuantizeMultiplierSmallerThanOneExp``: as ``quantize_multiplier`` for 0 < real < 1 (shift <= 0)."""
    if not 0.0 < real < 1.0:
        raise ValueError(f"multiplier {real} must be in (0, 1)")
    return quantize_multiplier(real)


def _div_trunc(a: np.ndarray, d: int) -> np.ndarray:
    """C++ integer division (truncates toward zero)."""
    q = np.abs(a) // d
    return np.where(a < 0, -q, q)


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``(a * b + nudge) / 2**31`` truncated, nudge
    ``2**30`` (or ``1 - 2**30`` for negative products); ``INT32_MIN * INT32_MIN`` saturates."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    y = _div_trunc(ab + nudge, 1 << 31)
    return np.where((a == INT32_MIN) & (b == INT32_MIN), np.int64(INT32_MAX), y)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: arithmetic shift right, rounding half away from zero."""
    x = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, m, shift) -> np.ndarray:
    """``MultiplyByQuantizedMultiplier(int32 x, int32 m, int shift)`` (``common.h``, double rounding)."""
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = np.asarray(x, dtype=np.int64) << left
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m), right)


def multiply_by_quantized_multiplier_smaller_than_one_exp(x, m, shift) -> np.ndarray:
    """``MultiplyByQuantizedMultiplierSmallerThanOneExp``: ``RoundingDivideByPOT(SRDHM(x, m), -shift)``."""
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m), -np.asarray(shift, dtype=np.int64))


def _f64(v) -> float:
    """A scale as the flatbuffer stores it (float32), widened to double as the kernels do."""
    return float(np.float32(v))


def conv_multipliers(in_scale: float, w_scales, out_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (m, shift) of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED:
    ``double(input_scale) * double(filter_scale[c]) / double(output_scale)``
    (``PopulateConvolutionQuantizationParams``; per-tensor filters are the one-channel case)."""
    pairs = [quantize_multiplier(_f64(in_scale) * _f64(s) / _f64(out_scale)) for s in np.asarray(w_scales).reshape(-1)]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def requantize_acc(acc, m, shift, zp: int, lo: int, hi: int, axis: int = 1) -> np.ndarray:
    """int32 accumulator -> int8 codes: ``clamp(MultiplyByQuantizedMultiplier(acc, m[c], shift[c]) + zp)``."""
    acc = np.asarray(acc, dtype=np.int64)
    m, shift = np.asarray(m, np.int64).reshape(-1), np.asarray(shift, np.int64).reshape(-1)
    if m.size > 1:
        shape = [1] * acc.ndim
        shape[axis] = m.size
        m, shift = m.reshape(shape), shift.reshape(shape)
    else:
        m, shift = m.reshape(()), shift.reshape(())
    return np.clip(multiply_by_quantized_multiplier(acc, m, shift) + int(zp), lo, hi)


def requantize(x, in_scale: float, in_zp: int, out_scale: float, out_zp: int, lo: int = -128,
               hi: int = 127) -> np.ndarray:
    """int8 -> int8 QUANTIZE (``quantize.cc`` ``Requantize``): multiplier ``double(s_in) / double(s_out)``,
    ``clamp(MultiplyByQuantizedMultiplier(x - z_in) + z_out)``; identical parameters copy."""
    x = np.asarray(x, dtype=np.int64)
    if np.float32(in_scale) == np.float32(out_scale) and int(in_zp) == int(out_zp):
        return np.clip(x, lo, hi)
    m, s = quantize_multiplier(_f64(in_scale) / _f64(out_scale))
    return np.clip(multiply_by_quantized_multiplier(x - int(in_zp), m, s) + int(out_zp), lo, hi)


def quantize(x, scale: float, zp: int, lo: int = -128, hi: int = 127) -> np.ndarray:
    """float32 -> int8 QUANTIZE (``reference_ops::AffineQuantize``): ``round(x / scale)`` in float32, half away
    from zero (``TfLiteRound``), plus the zero point, clamped."""
    f = np.asarray(x, dtype=np.float32) / np.float32(scale)
    r = np.sign(f) * np.floor(np.abs(f) + np.float32(0.5))  # exact: |f| + 0.5 is only inexact above 2**23
    return np.clip(r.astype(np.int64) + int(zp), lo, hi)


def dequantize(x, scale: float, zp: int) -> np.ndarray:
    """int8 -> float32 DEQUANTIZE: ``float(double(scale) * (x - zp))`` (one rounding, same as float32)."""
    return ((np.asarray(x, dtype=np.int64) - int(zp)).astype(np.float64) * _f64(scale)).astype(np.float32)


def add(a, sa: float, za: int, b, sb: float, zb: int, sy: float, zy: int, lo: int, hi: int) -> np.ndarray:
    """int8 ADD (``add.cc`` Prepare, ``reference_integer_ops::AddElementwise``): both inputs shifted left by 20,
    scaled by ``s_i / (2 max(sa, sb))``, summed, scaled by ``2 max(sa, sb) / (2**20 sy)``."""
    twice_max = 2.0 * max(_f64(sa), _f64(sb))
    m1, s1 = quantize_multiplier_smaller_than_one_exp(_f64(sa) / twice_max)
    m2, s2 = quantize_multiplier_smaller_than_one_exp(_f64(sb) / twice_max)
    mo, so = quantize_multiplier_smaller_than_one_exp(twice_max / ((1 << ADD_LEFT_SHIFT) * _f64(sy)))
    va = (np.asarray(a, dtype=np.int64) - int(za)) << ADD_LEFT_SHIFT
    vb = (np.asarray(b, dtype=np.int64) - int(zb)) << ADD_LEFT_SHIFT
    raw = multiply_by_quantized_multiplier_smaller_than_one_exp(va, m1, s1) + \
        multiply_by_quantized_multiplier_smaller_than_one_exp(vb, m2, s2)
    out = multiply_by_quantized_multiplier_smaller_than_one_exp(raw, mo, so) + int(zy)
    return np.clip(out, lo, hi)


def mul(a, sa: float, za: int, b, sb: float, zb: int, sy: float, zy: int, lo: int, hi: int) -> np.ndarray:
    """int8 MUL (``mul.cc``, ``reference_integer_ops::MulElementwise``): multiplier
    ``double(sa) * double(sb) / double(sy)`` applied to ``(a - za)(b - zb)``."""
    m, s = quantize_multiplier(_f64(sa) * _f64(sb) / _f64(sy))
    prod = (np.asarray(a, dtype=np.int64) - int(za)) * (np.asarray(b, dtype=np.int64) - int(zb))
    return np.clip(multiply_by_quantized_multiplier(prod, m, s) + int(zy), lo, hi)


def average_pool(x, kernel_shape, strides, lo: int = -128, hi: int = 127) -> np.ndarray:
    """int8 AVERAGE_POOL_2D, VALID padding (``reference_integer_ops::AveragePool``), NCHW codes: the sum of
    the window's codes (zero point included), divided by the count rounding half away from zero. Input and
    output share scale and zero point in TFLite."""
    x = np.asarray(x, dtype=np.int64)
    kh, kw = kernel_shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::strides[0], ::strides[1]]
    acc = win.sum(axis=(-1, -2))
    n = kh * kw
    acc = np.where(acc > 0, _div_trunc(acc + n // 2, n), _div_trunc(acc - n // 2, n))
    return np.clip(acc, lo, hi)


def leaky_relu(x, sx: float, zx: int, sy: float, zy: int, alpha: float, lo: int = -128, hi: int = 127) -> np.ndarray:
    """int8 LEAKY_RELU (``activations.cc`` LeakyReluPrepare, ``reference_ops::QuantizeLeakyRelu``):
    identity multiplier ``s_x / s_y`` for x >= z_x, ``s_x * alpha / s_y`` (alpha as float32) below."""
    mi, si = quantize_multiplier(_f64(sx) / _f64(sy))
    ma, sa = quantize_multiplier(_f64(sx) * _f64(alpha) / _f64(sy))
    v = np.asarray(x, dtype=np.int64) - int(zx)
    y = np.where(v >= 0, multiply_by_quantized_multiplier(v, mi, si), multiply_by_quantized_multiplier(v, ma, sa))
    return np.clip(y + int(zy), lo, hi)


def relu(x, sx: float, zx: int, sy: float, zy: int, lo: int, hi: int) -> np.ndarray:
    """int8 RELU / RELU6 with requantization (``activations.cc`` ``QuantizedReluX``, ``ReluX``):
    ``clamp(z_y + MultiplyByQuantizedMultiplier(x - z_x, s_x / s_y))`` to the activation range."""
    m, s = quantize_multiplier(_f64(sx) / _f64(sy))
    y = multiply_by_quantized_multiplier(np.asarray(x, dtype=np.int64) - int(zx), m, s) + int(zy)
    return np.clip(y, lo, hi)


def activation_range(act: str, scale: float, zp: int, qmin: int = -128, qmax: int = 127) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized``: the int8 clamp of a fused NONE / RELU / RELU6,
    ``zp + TfLiteRound(f / scale)`` in float32."""
    def q(f: float) -> int:
        v = np.float32(f) / np.float32(scale)
        return int(zp) + int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))
    if act == "NONE":
        return qmin, qmax
    if act == "RELU":
        return max(qmin, q(0.0)), qmax
    if act == "RELU6":
        return max(qmin, q(0.0)), min(qmax, q(6.0))
    raise ValueError(f"unknown fused activation {act!r}")
