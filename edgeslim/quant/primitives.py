"""All quantization math, in one place.

Every formula edgeslim uses to go between real and integer values lives here: integer ranges,
scale / zero-point selection, power-of-two scales, rounding and clamping, and the fixed-point
multiplier + shift used for integer requantization. Observers, quantized modules, lowering and
export call these functions; nothing else re-derives them.

Conventions (the ONNX ``QuantizeLinear`` / ``DequantizeLinear`` ones):
    q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale
``x / scale`` is computed as ``x * (1 / scale)`` in float32, exactly as
``torch.fake_quantize_per_tensor_affine`` does, so the two agree bit for bit (tests check this).
"""

from __future__ import annotations

import math

import torch

from ..errors import EdgeslimError
from .fixed_point import quantize_multiplier  # noqa: F401  (re-exported: all quantization math is reachable here)

__all__ = ["MIN_BITS", "MAX_BITS", "INT32_MIN", "INT32_MAX", "check_bits", "qrange", "pow2_scale", "choose_qparams",
           "activation_signed", "quantize", "dequantize", "fake_quantize", "grid_floor", "quantize_directed",
           "fake_quantize_soft", "fake_quantize_lsq", "quantize_bias", "sqnr_db"]


MIN_BITS, MAX_BITS = 2, 16
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_EPS = torch.finfo(torch.float32).eps


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit width (2..16) and return it."""
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise EdgeslimError(f"invalid {what} {bits!r}: use an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide signed or unsigned code: int8 -> (-128, 127), uint8 -> (0, 255)."""
    check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def pow2_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a scale *up* to the next power of two so the calibrated range still fits.

    Power-of-two scales turn every requantization into a bit shift (VTA, Lee et al., ETRI).
    """
    return torch.exp2(torch.ceil(torch.log2(scale.clamp_min(_EPS))))


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the real range [min_val, max_val] onto ``bits``-bit codes.

    Works per tensor (0-d inputs) or per channel (1-d inputs).

    * symmetric: zero point 0; ``scale = max(|min|, |max|) / qmax`` (Lee et al., ETRI, eq. 1). With
      ``signed=False`` (a non-negative tensor such as a ReLU output) the whole unsigned range is used.
    * asymmetric: the range is widened to include 0 (so zero padding and ReLU are exact), then
      ``scale = (max - min) / (qmax - qmin)`` and ``zero_point = qmin - round(min / scale)``.
    * pow2: the scale is rounded up to a power of two (the zero point is chosen after rounding).

    Example:
        >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), 8, symmetric=True, signed=True)
        >>> round(float(s) * 127, 6), int(z)
        (2.0, 0)
    """
    qmin, qmax = qrange(bits, signed)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise EdgeslimError("NaN/inf in a calibrated range: check the calibration data and the model's numerics")
    if symmetric:
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (amax / qmax).clamp_min(_EPS)
        if pow2:
            scale = pow2_scale(scale)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
        return scale, zero_point
    lo = torch.minimum(min_val, torch.zeros_like(min_val))
    hi = torch.maximum(max_val, torch.zeros_like(max_val))
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    if pow2:
        scale = pow2_scale(scale)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int64)
    return scale, zero_point


def activation_signed(min_val: torch.Tensor | float, symmetric: bool) -> bool:
    """Integer type of an activation: symmetric tensors that can be negative are signed; everything
    else (asymmetric, or symmetric but never negative, e.g. after ReLU) uses the unsigned range."""
    return bool(symmetric and float(min_val) < 0)


def _broadcast(v: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis] = -1
    return v.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """Real -> integer codes (returned as int64). Round half to even, as ONNX QuantizeLinear."""
    inv = _broadcast(1.0 / scale.to(torch.float32), x, axis)
    zp = _broadcast(zero_point.to(torch.int64), x, axis)
    return (torch.round(x.to(torch.float32) * inv).to(torch.int64) + zp).clamp(qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Integer codes -> real values, as ONNX DequantizeLinear."""
    zp = _broadcast(zero_point.to(torch.int64), q, axis)
    return (q.to(torch.int64) - zp).to(torch.float32) * _broadcast(scale.to(torch.float32), q, axis)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """quantize then dequantize: what the integer device sees, expressed in real values.

    Runs torch's fused fake-quant kernels (one pass, straight-through gradient); a test checks they
    equal ``dequantize(quantize(x))`` bit for bit.
    """
    x = x.to(torch.float32)
    if axis is None or scale.dim() == 0:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return _fake_quantize_no_grad(x, scale.reshape(()).to(torch.float32), float(zero_point), qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).to(torch.float32),
                                                     zero_point.reshape(()).to(torch.int32), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.to(torch.float32), zero_point.to(torch.int32),
                                                  axis, qmin, qmax)


def _fake_quantize_no_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int
                           ) -> torch.Tensor:
    """torch's per-tensor fake-quant kernel, step for step, as five vectorized in-place passes: its CPU kernel is
    scalar and also writes the gradient mask, about 7x slower on a ResNet-20 activation. The same float32
    arithmetic: ``x * (1 / s)``, round half to even, ``+ zp``, clamp, ``- zp``, ``* s`` (every value after the
    rounding is an integer, so ``+ zp`` / ``- zp`` and the clamp are exact as in its int64 code; tests compare the
    two bit for bit)."""
    y = x * (1.0 / scale)
    return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def grid_floor(x: torch.Tensor, scale: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``floor(x / scale)`` (as ``x * (1 / scale)`` in float32, like ``quantize``) and the remainder in [0, 1)."""
    t = x.to(torch.float32) * _broadcast(1.0 / scale.to(torch.float32), x, axis)
    low = torch.floor(t)
    return low, t - low


def quantize_directed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None, round_up: torch.Tensor) -> torch.Tensor:
    """Integer codes with a chosen rounding direction per element (AdaRound): ``floor(x / s) + up + zp``, clamped."""
    low, _ = grid_floor(x.detach(), scale, axis)
    zp = _broadcast(zero_point.to(torch.int64), x, axis)
    return (low.to(torch.int64) + round_up.to(torch.int64) + zp).clamp(qmin, qmax)


def fake_quantize_soft(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       axis: int | None, h: torch.Tensor) -> torch.Tensor:
    """AdaRound's relaxed weights: ``(clamp(floor(x / s) + h + zp) - zp) * s`` with ``h`` in [0, 1]
    (differentiable in ``h``; ``h`` in {0, 1} gives exactly ``dequantize(quantize_directed(...))``)."""
    low, _ = grid_floor(x.detach(), scale, axis)
    zp = _broadcast(zero_point.to(torch.float32), x, axis)
    q = torch.clamp(low + h + zp, qmin, qmax)
    return (q - zp) * _broadcast(scale.to(torch.float32), x, axis)


def fake_quantize_lsq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """Per-tensor fake quantization differentiable in ``scale`` (LSQ, Esser et al. 2020): rounding is
    straight-through, the clamp passes no gradient to ``x``; ``grad_scale`` scales the step size's gradient.
    Forward values equal ``fake_quantize`` (round half to even)."""
    s = scale * grad_scale + (scale - scale * grad_scale).detach()
    t = x / s
    t = t + (torch.round(t) - t).detach()
    q = torch.clamp(t + zero_point.to(torch.float32), qmin, qmax)
    return (q - zero_point.to(torch.float32)) * s


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Bias -> int32 codes with scale ``input_scale * weight_scale`` and zero point 0 (ONNX QLinearConv)."""
    s = (input_scale * weight_scale).to(torch.float32)
    return torch.round(bias.to(torch.float64) / s.double()).clamp(INT32_MIN, INT32_MAX).to(torch.int64)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x_hat|^2)."""
    signal = float(reference.double().pow(2).sum())
    noise = float((reference.double() - approx.double()).pow(2).sum())
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)
