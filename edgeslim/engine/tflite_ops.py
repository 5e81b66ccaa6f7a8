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

__all__ = ["INT32_MIN", "INT32_MAX", "ADD_LEFT_SHIFT", "quantize_multiplier",
           "quantize_multiplier_smaller_than_one_exp", "saturating_rounding_doubling_high_mul",
           "rounding_divide_by_pot", "multiply_by_quantized_multiplier",
           "multiply_by_quantized_multiplier_smaller_than_one_exp", "conv_multipliers", "requantize_acc", "requantize",
           "quantize", "dequantize", "add", "mul", "average_pool", "mean_multiplier", "mean", "leaky_relu", "relu",
           "activation_range", "LOGISTIC_OUT", "logistic", "hard_swish_params", "hard_swish"]


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


def mean_multiplier(sx: float, sy: float, n: int) -> tuple[int, int]:
    """int8 MEAN's multiplier for ``n`` averaged elements: ``QuantizeMultiplier(double(s_x) / double(s_y))``, then
    the 1/n folded in by integer division, ``(m << k) / n`` with ``k = min(floor(log2 n), 32, 31 + shift)``
    (``reference_integer_ops::Mean``; LiteRT reference and TFLM matched it on 2,340 outputs of 120 random
    shapes / scales, where rounding ``s_x / (s_y n)`` afresh missed 6)."""
    m, s = quantize_multiplier(_f64(sx) / _f64(sy))
    k = min(int(n).bit_length() - 1, 32, 31 + s)
    return (m << k) // int(n), s - k


def mean(x, sx: float, zx: int, sy: float, zy: int, lo: int = -128, hi: int = 127, keepdims: bool = True):
    """int8 MEAN over H, W of NCHW codes: ``MultiplyByQuantizedMultiplier(sum(x - z_x), mean_multiplier) + z_y``."""
    x = np.asarray(x, dtype=np.int64)
    n = x.shape[2] * x.shape[3]
    acc = (x - int(zx)).sum(axis=(2, 3), keepdims=keepdims)
    m, s = mean_multiplier(sx, sy, n)
    return np.clip(multiply_by_quantized_multiplier(acc, m, s) + int(zy), lo, hi)


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


# ----------------------------------------------------------------------------- int8 activation builtins

LOGISTIC_OUT = (1.0 / 256.0, -128)  # the int8 LOGISTIC output parameters TFLite requires (activations.cc)


def logistic(x, sx: float, zx: int) -> np.ndarray:
    """int8 LOGISTIC, output scale 1/256, zero point -128: ``round(256 / (1 + exp(-s_x (x - z_x)))) - 128`` in
    float32, rounding half away from zero (the lookup table LiteRT builds in ``activations.cc``; LiteRT's reference
    and optimized kernels and TFLM gave exactly this on 150 random input scales x 256 codes,
    ``tests/export/test_tflite.py``)."""
    d = np.float32(sx) * (np.asarray(x, dtype=np.int64) - int(zx)).astype(np.float32)
    with np.errstate(over="ignore"):  # exp(88+) = inf: the sigmoid is 0 there, as in C
        f = (np.float32(1) / (np.float32(1) + np.exp(-d, dtype=np.float32))).astype(np.float32)
    r = f * np.float32(256)
    return np.clip(np.floor(r + np.float32(0.5)).astype(np.int64) - 128, -128, 127)


def _srdhm16(a, b) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int16: ``(a b + 2**14 nudge) / 2**15`` toward zero."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 14), np.int64(1 - (1 << 14)))
    y = _div_trunc(ab + nudge, 1 << 15)
    return np.where((a == -(1 << 15)) & (b == -(1 << 15)), np.int64((1 << 15) - 1), y)


def _sat16(x) -> np.ndarray:
    return np.clip(x, -(1 << 15), (1 << 15) - 1)


def _int16_multiplier(m32: int) -> int:
    """``DownScaleInt32ToInt16Multiplier``: round a Q31 multiplier to Q15 (half up), saturating at 2**15 - 1."""
    return min((m32 + (1 << 15)) >> 16, (1 << 15) - 1)


def hard_swish_params(sx: float, sy: float) -> dict | None:
    """``HardSwishPrepare`` (activations.cc): int16 multipliers from float32 scales, or None when TFLite refuses
    the scales (``output_multiplier_exponent <= 0`` fails: an output scale below ``s_x / 128``)."""
    f32 = np.float32
    hires = f32(1.0 / 128.0) * f32(sx)
    m_out, e_out = quantize_multiplier(float(f32(hires / f32(sy))))
    m_relu, e_relu = quantize_multiplier(float(f32(hires / f32(3.0 / 32768.0))))
    if e_out > 0:
        return None
    return {"out_m": _int16_multiplier(m_out), "out_e": e_out, "relu_m": _int16_multiplier(m_relu), "relu_e": e_relu}


def hard_swish(x, sx: float, zx: int, sy: float, zy: int, lo: int = -128, hi: int = 127) -> np.ndarray:
    """int8 HARD_SWISH (``reference_ops::HardSwish``): int16 fixed point, ``x * relu6(x + 3) / 6`` with the
    'reluish' factor in Q15 and the output multiplier in Q15 (``hard_swish_params``)."""
    p = hard_swish_params(sx, sy)
    if p is None:
        raise ValueError("HARD_SWISH needs an output scale of at least s_x / 128")
    v = np.asarray(x, dtype=np.int64) - int(zx)
    hires = _sat16(v * 128)
    pre_out = _srdhm16(hires, p["out_m"])
    relu = hires
    if p["relu_e"] > 0:
        relu = _sat16(relu << (p["relu_e"] - 1))
    relu = _srdhm16(relu, p["relu_m"])
    if p["relu_e"] > 0:
        relu = _sat16(relu << 1)
    if p["relu_e"] < 0:
        relu = rounding_divide_by_pot(relu, -p["relu_e"])
    relu = (relu + (1 << 15)) >> 1
    prod = relu * pre_out  # SaturatingDoublingHighMul: (a b) / 2**15 toward zero, no rounding
    pre = _div_trunc(prod, 1 << 15)
    pre = np.where((relu == -(1 << 15)) & (pre_out == -(1 << 15)), np.int64((1 << 15) - 1), pre)
    out = rounding_divide_by_pot(pre, -p["out_e"]) + int(zy)
    return np.clip(out, lo, hi)
