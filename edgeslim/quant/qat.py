"""Quantizers and gradient estimators for quantization-aware training.

A quantizer maps a real tensor onto ``scale * (code - zero_point)`` where ``code`` is one of a *level set*
of integers:

* ``uniform``: every integer in ``[qmin, qmax]`` (the PTQ grid of the previous stages);
* ``pot``: zero and signed powers of two, ``{0, 2^0, 2^1, ..., 2^E}`` (Miyashita et al. 2016);
* ``apot``: additive powers of two (Li et al. 2020, Kim et al. eq. 4): sums of ``n`` terms, term ``i`` taking
  ``0`` or ``2^-(i + j n)``; the exponents of different terms never collide, so every sum is distinct.

Non-uniform levels are kept as *integers* (each a power of two or a sum of ``n`` of them, times a common
power of two), so a level times an integer activation is a shift (or ``n`` shifts and adds) and the
quantizer's ``scale`` is the real value of one unit. ``bits`` counts codes as uniform does: a signed
``b``-bit set has ``2^(b-1)`` magnitudes (zero included) on each side, an unsigned one ``2^b``.

Estimators say how the gradient passes the rounding (the forward value is always the hard level, the
function that is deployed):

* ``ste``: straight-through inside the range, zero outside (Bengio et al. 2013); scales fixed;
* ``lsq``: straight-through for the input, learned scale with LSQ's gradient and its ``1/sqrt(N q_max)``
  gradient scaling (Esser et al. 2020);
* ``ewgs``: ``g_x = g_q (1 + delta sign(g_q) (x - q))`` in code units (Lee et al. 2021); ``delta`` is set from
  a Hutchinson estimate of the Hessian trace (``algorithms.qat``);
* ``dsq``: the derivative of DSQ's tanh soft step between the two neighbouring levels, with a sharpness
  ``alpha`` that the trainer anneals (Gong et al. 2019);
* ``daq``: the derivative of DAQ's distance-aware soft rounding (a kernel soft-argmax over the two
  neighbouring levels) with the adaptive temperature ``beta* = gamma / |d_floor - d_ceil|`` (Kim et al. 2021).

Every estimator but ``ste`` learns the scale with LSQ's gradient (for PoT / APoT this is APoT's clipping
gradient: ``q/alpha - x/alpha`` inside the range, the end level outside).

Training runs each quantizer as one autograd function (``_FakeQuant``): the forward pass is four whole-tensor
passes (divide, round, clamp, scale) that keep ``x / s`` and the output; the backward pass of the straight-through
methods is one masked copy for the input and two dot products for the scale. The plain formulas
(``TrainableQuantizer.reference``, still used for the Hessian estimate) build a graph of about a dozen elementwise
ops and as many in the backward pass. Values are the plain formulas' exactly, gradients equal to float rounding
(tests/algorithms/test_qat_fused.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import EdgeslimError

__all__ = ["QUANTIZERS", "METHODS", "LevelSet", "soft_gradient", "TrainableQuantizer"]


QUANTIZERS = ("uniform", "pot", "apot")
METHODS = ("ste", "lsq", "ewgs", "dsq", "daq")


def _magnitudes(kind: str, count: int) -> list[int]:
    """``count`` non-negative integer magnitudes (0 first, ascending) of a level set."""
    if count < 2:
        raise EdgeslimError("a quantizer needs at least 2 levels: use 2 bits or more")
    if kind == "uniform":
        return list(range(count))
    bits = int(round(math.log2(count)))
    if kind == "pot":  # 0 and 2^0 .. 2^(count-2)
        return [0] + [1 << j for j in range(count - 1)]
    if kind == "apot":
        n = max(1, math.ceil(bits / 2))  # terms of 2 bits each, the last takes an odd bit
        widths = [2] * (n - 1) + [bits - 2 * (n - 1)]
        top = max(i + ((1 << k) - 2) * n for i, k in enumerate(widths))  # the smallest term's exponent
        sums = {0}
        for i, k in enumerate(widths):
            terms = [0] + [1 << (top - (i + j * n)) for j in range((1 << k) - 1)]
            sums = {s + t for s in sums for t in terms}
        return sorted(sums)
    raise EdgeslimError(f"unknown quantizer {kind!r}: use one of {', '.join(QUANTIZERS)}")


class LevelSet:
    """The integer codes a quantizer may produce, sorted. ``uniform`` sets are ``[qmin, qmax]``."""

    def __init__(self, kind: str, bits: int, signed: bool, *, qmin: int | None = None, qmax: int | None = None):
        if kind not in QUANTIZERS:
            raise EdgeslimError(f"unknown quantizer {kind!r}: use one of {', '.join(QUANTIZERS)}")
        if not 2 <= bits <= 8:
            raise EdgeslimError(f"QAT supports 2 to 8 bits, got {bits}: pick --w-bits / --a-bits in 2..8")
        self.kind, self.bits, self.signed = kind, bits, signed
        if kind == "uniform":
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            self.qmin, self.qmax = (lo if qmin is None else qmin), (hi if qmax is None else qmax)
            self.levels = torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)
        else:
            mags = _magnitudes(kind, 1 << (bits - 1) if signed else 1 << bits)
            vals = sorted({-m for m in mags} | set(mags)) if signed else mags
            self.levels = torch.tensor(vals, dtype=torch.float32)
            self.qmin, self.qmax = int(vals[0]), int(vals[-1])
        self.mid = (self.levels[1:] + self.levels[:-1]) / 2  # decision thresholds

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    def round(self, t: torch.Tensor) -> torch.Tensor:
        """Nearest level of ``t`` (clamped to the range); ties go to the even code (uniform) or the lower level."""
        if self.uniform:
            return torch.round(t).clamp(self.qmin, self.qmax)
        idx = torch.bucketize(t, self.mid.to(t.device))
        return self.levels.to(t.device)[idx]

    def neighbours(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The levels just below and above ``t`` (``t`` inside the range)."""
        if self.uniform:
            lo = torch.floor(t).clamp(self.qmin, self.qmax - 1)
            return lo, lo + 1
        levels = self.levels.to(t.device)
        i = (torch.bucketize(t, levels, right=True) - 1).clamp(0, len(levels) - 2)
        return levels[i], levels[i + 1]

    def __repr__(self) -> str:
        shown = self.levels.tolist() if len(self.levels) <= 9 else f"{len(self.levels)} levels"
        return f"LevelSet({self.kind}, {self.bits} bits, {'signed' if self.signed else 'unsigned'}, {shown})"


class _EWGSRound(torch.autograd.Function):
    """Forward: the hard codes ``q``; backward ``g (1 + delta sign(g) (t - q))`` inside the range, 0 outside."""

    @staticmethod
    def forward(ctx, t, q, inside, delta):
        ctx.save_for_backward(t - q, inside, delta)
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        diff, inside, delta = ctx.saved_tensors
        return g * (1 + delta * torch.sign(g) * diff) * inside, None, None, None


def soft_gradient(method: str, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, alpha: float,
                  gamma: float) -> torch.Tensor:
    """A differentiable function of ``t`` whose derivative is the estimator's ``dq/dt`` (values are not used):
    DSQ's tanh step or DAQ's distance-aware soft rounding between the neighbouring levels ``lo``, ``hi``."""
    width = hi - lo
    r = (t - lo) / width  # position between the two levels, in [0, 1]
    if method == "dsq":
        k = math.log(2.0 / alpha - 1.0)  # sharpness from DSQ's alpha = 1 - tanh(k / 2)
        soft = (torch.tanh(k * (r - 0.5)) / math.tanh(k / 2) + 1) / 2
    elif method == "daq":
        d_lo, d_hi = r, 1 - r
        beta = (gamma / (d_lo - d_hi).abs().clamp_min(gamma / 50.0)).detach()  # adaptive temperature
        soft = torch.sigmoid(beta * (d_lo - d_hi))  # weight of the upper level in a kernel soft-argmax
    else:
        raise ValueError(method)
    return lo + width * soft


class TrainableQuantizer(nn.Module):
    """Fake-quantizes a weight (per output channel) or an activation (per tensor) during training.

    ``scale`` is a parameter (learned unless the method is ``ste``); ``zero_point`` is fixed. ``delta``
    (EWGS) and ``alpha`` (DSQ) are set by the trainer. ``hutchinson`` switches to plain STE and keeps the
    output so the trainer can estimate the Hessian trace with respect to it. ``fused`` (class-wide, default
    True) runs ``_FakeQuant``; False runs ``reference`` everywhere (same values; for timing the two).
    """

    fused = True

    def __init__(self, levels: LevelSet, method: str, scale: torch.Tensor, zero_point: torch.Tensor,
                 axis: int | None, *, numel: int | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise EdgeslimError(f"unknown QAT method {method!r}: use one of {', '.join(METHODS)}")
        self.levels, self.method, self.axis, self.gamma = levels, method, axis, gamma
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=method != "ste")
        self.register_buffer("zero_point", zero_point.detach().clone().float())
        self.register_buffer("delta", torch.zeros(()))
        self.alpha = 0.2
        self.hutchinson = False  # plain STE through ``reference`` (twice differentiable), output kept
        self.last_output: torch.Tensor | None = None
        self.qp = max(1, abs(levels.qmax), abs(levels.qmin))
        # LSQ's gradient scale 1 / sqrt(N q_max): N = weights per scale, or features per image (activations,
        # ``numel=None``: taken from the first batch)
        self.grad_scale = None if numel is None else 1.0 / math.sqrt(max(1, numel // max(1, scale.numel())) * self.qp)

    def _shape(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or v.dim() == 0:
            return v
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return v.reshape(shape)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.abs().clamp_min(1e-8)
        if self.grad_scale is None:
            self.grad_scale = 1.0 / math.sqrt(max(1, x[0].numel()) * self.qp)
        if self.method != "ste" and self.training and torch.is_grad_enabled():
            s = s.detach() + (s - s.detach()) * self.grad_scale  # LSQ gradient scaling (the value is unchanged)
        return self._shape(s, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hutchinson or not self.fused:
            return self.reference(x)
        s, zp = self._scale(x), self._shape(self.zero_point, x)
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
            if self.training and x.dtype == torch.float32:  # ``_pass_band``'s bounds are float32 values
                return _FakeQuant.apply(x, s, zp, self)
            return self.reference(x)  # evaluation mode with gradients, or another dtype: the plain graph
        return _fake_quant_value(x, s, zp, self.levels, bool(self.zero_point.any()))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formulas, one autograd op each (``fused = False``, the Hessian estimate, and the oracle of
        the fused path): ``y = (code(x / s + zp) - zp) * s``."""
        s, zp = self._scale(x), self._shape(self.zero_point, x)
        t = x / s + zp
        q = self.code(t)
        y = (q - zp) * s
        if self.hutchinson:
            self.last_output = y
        return y

    def code(self, t: torch.Tensor) -> torch.Tensor:
        """Hard codes in the forward pass; the estimator's surrogate gradient in the backward pass.

        The input gradient passes where the code is not clipped: for uniform grids where the *rounded* value
        lies in ``[qmin, qmax]`` (PyTorch's fake-quant convention), for level sets where ``t`` does."""
        lv = self.levels
        td = t.detach()
        hard = lv.round(td)
        if not (self.training and torch.is_grad_enabled() and t.requires_grad):
            return hard
        r = torch.round(td) if lv.uniform else td
        inside = (r >= lv.qmin) & (r <= lv.qmax)
        if self.method == "ewgs" and not self.hutchinson and float(self.delta) != 0.0:
            return _EWGSRound.apply(t, hard, inside, self.delta)
        if self.method in ("dsq", "daq") and not self.hutchinson:
            clamped = t.clamp(lv.qmin, lv.qmax)
            lo, hi = lv.neighbours(clamped.detach())
            soft = soft_gradient(self.method, clamped, lo, hi, alpha=self.alpha, gamma=self.gamma)
            return hard + (soft - soft.detach()) * inside
        return hard + (t - td) * inside  # straight-through (ste, lsq, ewgs before delta is set)

    def extra_repr(self) -> str:
        return f"{self.levels!r}, method={self.method}"


# -- the fused training path -------------------------------------------------------------------------------

def _fake_quant_value(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, lv: LevelSet, shifted: bool) -> torch.Tensor:
    """``(code(x / s + zp) - zp) * s`` without a graph, the same float operations as ``reference`` (in place)."""
    t = x / s
    if shifted:
        t.add_(zp)
    if lv.uniform:
        t = t.round_().clamp_(lv.qmin, lv.qmax)
    else:
        t = lv.round(t)
    if shifted:
        t.sub_(zp)
    return t.mul_(s)


def _straight_through(q: "TrainableQuantizer") -> bool:
    """Whether the input gradient is the clipping mask (STE, LSQ, EWGS before its first delta)."""
    return q.method in ("ste", "lsq") or (q.method == "ewgs" and float(q.delta) == 0.0)


def _pass_band(lv: LevelSet) -> tuple[float, float]:
    """Open bounds ``(lo, hi)`` (float32 values) with ``lo < t < hi`` exactly where the plain graph passes the
    input gradient: the rounded ``t`` in ``[qmin, qmax]`` for uniform grids (a tie ``k + 0.5`` rounds to the even
    neighbour, so the end ties pass when that end is even), ``t`` itself for level sets."""
    down = lambda v: float(np.nextafter(np.float32(v), np.float32(-np.inf)))  # noqa: E731
    up = lambda v: float(np.nextafter(np.float32(v), np.float32(np.inf)))  # noqa: E731
    if not lv.uniform:
        return down(lv.qmin), up(lv.qmax)
    lo, hi = lv.qmin - 0.5, lv.qmax + 0.5
    return (down(lo) if lv.qmin % 2 == 0 else lo), (up(hi) if lv.qmax % 2 == 0 else hi)


def _sum_to(v: torch.Tensor, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum(v * w)`` reduced to the scale's ``shape`` (a dot product for a per-tensor scale)."""
    if len(shape) == 0 and v.is_contiguous() and w.is_contiguous():
        return torch.dot(v.reshape(-1), w.reshape(-1))
    return (v * w).sum_to_size(shape)


class _FakeQuant(torch.autograd.Function):
    """``TrainableQuantizer.reference`` as one autograd op: ``y = (code(t) - zp) * s`` with ``t = x / s + zp``.

    Straight-through methods (the hot path) keep ``t`` and ``y``. The input gradient is ``g`` where the code is
    not clipped, one vectorized masked copy (``hardtanh_backward`` with bounds that reproduce the rounding's ties,
    ``_pass_band``); the scale's is ``dy/ds = (code - zp) - [inside] x / s`` summed as the plain graph sums it,
    ``sum(g y) / s - sum(g_x (t - zp))``, two dot products per tensor. The forward pass is two new tensors and two
    in-place passes and keeps no boolean mask (``where`` / multiplying by a bool mask measured about ten times a
    float pass here). The plain graph computes ``g_x = (g s) / s`` and sums the two scale terms in another order,
    so the two agree to float rounding.
    EWGS (with a delta), DSQ and DAQ keep ``t`` and the codes and evaluate the plain graph's backward formulas."""

    @staticmethod
    def forward(ctx, x, s, zp, q):
        lv = q.levels
        shifted = bool(q.zero_point.any())
        t = x / s
        if shifted:
            t.add_(zp)
        ctx.straight = _straight_through(q)
        if ctx.straight:
            y = torch.round(t).clamp_(lv.qmin, lv.qmax) if lv.uniform else lv.round(t)
            if shifted:
                y.sub_(zp)
            y.mul_(s)
            ctx.save_for_backward(t, s, zp if shifted else None)
            ctx.band, ctx.levels = _pass_band(lv), lv
            # the output, for the scale gradient: a detached alias (no reference cycle through grad_fn) that shares
            # the version counter, so an in-place op on the output downstream is seen and the codes recomputed
            ctx.y, ctx.y_version = (y.detach(), y._version) if ctx.needs_input_grad[1] else (None, None)
            return y
        # EWGS / DSQ / DAQ: keep what the plain graph's backward reads
        hard = lv.round(t)
        r = torch.round(t) if lv.uniform else t
        inside = (r >= lv.qmin) & (r <= lv.qmax)
        ctx.save_for_backward(x, s, zp, t, hard, inside)
        ctx.levels = lv
        ctx.method, ctx.delta, ctx.alpha, ctx.gamma = q.method, q.delta.detach().clone(), q.alpha, q.gamma
        return (hard - zp) * s

    @staticmethod
    def backward(ctx, g):
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.straight:
            t, s, zp = ctx.saved_tensors
            gx = torch.ops.aten.hardtanh_backward(g, t, *ctx.band)
            gs = None
            if need_s:
                y = ctx.y
                if y._version != ctx.y_version:  # modified in place after this op: recompute it
                    lv = ctx.levels
                    y = torch.round(t).clamp_(lv.qmin, lv.qmax) if lv.uniform else lv.round(t)
                    y = (y if zp is None else y.sub_(zp)).mul_(s)
                gs = _sum_to(g, y, s.shape) / s - _sum_to(gx, t if zp is None else t - zp, s.shape)
            return (gx if need_x else None), gs, None, None
        x, s, zp, t, hard, inside = ctx.saved_tensors
        gq = g * s
        if ctx.method == "ewgs":
            gt = gq * (1 + ctx.delta * torch.sign(gq) * (t - hard)) * inside  # _EWGSRound's backward
        else:  # DSQ / DAQ: the derivative of the soft step, through the clamp
            lv = ctx.levels
            with torch.enable_grad():
                tt = t.detach().requires_grad_(True)
                clamped = tt.clamp(lv.qmin, lv.qmax)
                lo, hi = lv.neighbours(clamped.detach())
                soft = soft_gradient(ctx.method, clamped, lo, hi, alpha=ctx.alpha, gamma=ctx.gamma)
                gt, = torch.autograd.grad(soft, tt, gq * inside)
        gx = gt / s if need_x else None
        gs = None
        if need_s:
            gs = (g * (hard - zp)).sum_to_size(s.shape) + (-gt * ((x / s) / s)).sum_to_size(s.shape)
        return gx, gs, None, None
