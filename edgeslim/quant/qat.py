"""Quantizers and gradient estimators for quantization-aware training.

A quantizer maps a real tensor onto ``scale * (code - zero_point)`` where ``code`` is one of a *level set*
of integers:

* ``uniform``: every integer in ``[qmin, qmax]`` (the PTQ grid of the previous stages);
* ``pot``: zero and signed powers of two, ``{0, 2^0, 2^1, ..., 2^E}`` (Miyashita et al. 2016);
* ``apot``: additive powers of two (Li et al. 2020, seed 004 eq. 4): sums of ``n`` terms, term ``i`` taking
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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import EdgeslimError

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
    output so the trainer can estimate the Hessian trace with respect to it.
    """

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
        self.hutchinson = False
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.abs().clamp_min(1e-8)
        if self.grad_scale is None:
            self.grad_scale = 1.0 / math.sqrt(max(1, x[0].numel()) * self.qp)
        if self.method != "ste" and self.training and torch.is_grad_enabled():
            s = s.detach() + (s - s.detach()) * self.grad_scale  # LSQ gradient scaling (the value is unchanged)
        s, zp = self._shape(s, x), self._shape(self.zero_point, x)
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
