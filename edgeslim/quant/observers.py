"""Calibration observers: ``observe(x)`` records statistics, ``qrange_real(bits, signed)`` picks the real range.

Calibration is two passes over the calibration images (see ``algorithms/calibrate.py``):
pass 1 records min / max for every tensor; pass 2, only for histogram-based calibrators, fills a
fixed-range histogram (2048 bins over [min, max]) so every observer sees the same bins whatever the
batch order. The chosen real range then goes through ``primitives.choose_qparams``.

* ``minmax``: the observed range.
* ``percentile``: clip at the 99.99th percentile of |x| (both tails for asymmetric).
* ``entropy``: the clipping threshold that minimizes the KL divergence between the histogram and its
  quantized version (the TensorRT 8-bit calibration procedure, Migacz 2017).
* ``mse``: the clipping range that minimizes the expected squared quantization error over the histogram.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..errors import EdgeslimError
from . import primitives as P

__all__ = ["HIST_BINS", "PERCENTILE", "Observer", "all_finite", "finite_min_max", "MinMaxObserver", "HistogramObserver", "PercentileObserver",
           "EntropyObserver", "MSEObserver", "mse_weight_range", "OBSERVERS"]


HIST_BINS = 2048
PERCENTILE = 99.99


class Observer(Protocol):
    needs_histogram: bool

    def observe(self, x: torch.Tensor) -> torch.Tensor: ...

    def observe_histogram(self, x: torch.Tensor) -> None: ...

    def real_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


def _min_max(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return torch.aminmax(x)
    return torch.aminmax(x.transpose(0, axis).reshape(x.shape[axis], -1), dim=1)


def finite_min_max(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` (per slice along ``axis``), refused with an ``EdgeslimError`` if ``x`` holds NaN / inf.

    One pass (``torch.aminmax``) instead of ``isfinite(x).all()`` plus a min and a max pass: a NaN anywhere makes
    its slice's min and max NaN (torch's reductions propagate NaN, IEEE 754 ``minimum`` / ``maximum``) and an
    infinity is the min or the max of its slice, so the range is finite exactly when ``x`` is."""
    lo, hi = _min_max(x, axis)
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        raise EdgeslimError(
            "NaN/inf activations during calibration: check the input normalization and the model weights"
        )
    return lo, hi


def all_finite(x: torch.Tensor) -> bool:
    """``bool(torch.isfinite(x).all())`` in one ``aminmax`` pass (see ``finite_min_max``); True when empty."""
    if x.numel() == 0 or not x.is_floating_point():
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class MinMaxObserver:
    """Running min / max, per tensor or per output channel (``axis``)."""

    needs_histogram = False

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        lo, hi = finite_min_max(x, self.axis)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        return x

    def observe_histogram(self, x: torch.Tensor) -> None:
        return None

    def real_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val is None:
            raise EdgeslimError("a quantizer saw no data during calibration: pass a non-empty --calib-data")
        return self.min_val, self.max_val


class HistogramObserver(MinMaxObserver):
    """Min / max first, then a histogram over that fixed range; subclasses choose the clipping range."""

    needs_histogram = True

    def __init__(self) -> None:
        super().__init__(axis=None)
        self.hist: np.ndarray | None = None

    def observe_histogram(self, x: torch.Tensor) -> None:
        lo, hi = float(self.min_val), float(self.max_val)
        if hi <= lo:
            return
        h = torch.histc(x.detach().float(), bins=HIST_BINS, min=lo, max=hi).double().numpy()
        self.hist = h if self.hist is None else self.hist + h

    def _edges(self) -> np.ndarray:
        return np.linspace(float(self.min_val), float(self.max_val), HIST_BINS + 1)

    def real_range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().real_range(bits, symmetric)
        if self.hist is None or self.hist.sum() == 0:
            return lo, hi
        new_lo, new_hi = self._clip(bits, symmetric)
        return torch.tensor(max(new_lo, float(lo))), torch.tensor(min(new_hi, float(hi)))

    def _clip(self, bits: int, symmetric: bool) -> tuple[float, float]:
        raise NotImplementedError

    def _abs_hist(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of |x| on bins of the same width, from 0 to max|x|: (counts, upper edges)."""
        edges = self._edges()
        centers = 0.5 * (edges[:-1] + edges[1:])
        amax = max(abs(edges[0]), abs(edges[-1]))
        width = edges[1] - edges[0]
        n = max(int(np.ceil(amax / width)), 1)
        counts = np.zeros(n)
        idx = np.minimum((np.abs(centers) / width).astype(np.int64), n - 1)
        np.add.at(counts, idx, self.hist)
        return counts, (np.arange(n) + 1) * width


class PercentileObserver(HistogramObserver):
    def _clip(self, bits: int, symmetric: bool) -> tuple[float, float]:
        edges = self._edges()
        cdf = np.cumsum(self.hist) / self.hist.sum()
        tail = 1.0 - PERCENTILE / 100.0
        if symmetric:
            counts, upper = self._abs_hist()
            acdf = np.cumsum(counts) / counts.sum()
            t = float(upper[min(np.searchsorted(acdf, 1.0 - tail), len(upper) - 1)])
            return -t, t
        lo = float(edges[np.searchsorted(cdf, tail)])
        hi = float(edges[min(np.searchsorted(cdf, 1.0 - tail) + 1, HIST_BINS)])
        return lo, hi


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration on the |x| histogram (TensorRT's entropy calibrator)."""

    def _clip(self, bits: int, symmetric: bool) -> tuple[float, float]:
        counts, upper = self._abs_hist()
        levels = 1 << (bits - 1) if float(self.min_val) < 0 else 1 << bits
        t = upper[_kl_threshold(counts, levels) - 1]
        return -float(t), float(t)


class MSEObserver(HistogramObserver):
    """Clip range minimizing the histogram-weighted squared error of fake quantization."""

    def _clip(self, bits: int, symmetric: bool) -> tuple[float, float]:
        edges = self._edges()
        centers = torch.tensor(0.5 * (edges[:-1] + edges[1:]), dtype=torch.float32)
        weights = torch.tensor(self.hist, dtype=torch.float64)
        lo0, hi0 = float(self.min_val), float(self.max_val)
        best, best_err = (lo0, hi0), float("inf")
        for alpha in np.linspace(0.2, 1.0, 81):
            lo, hi = torch.tensor(lo0 * alpha), torch.tensor(hi0 * alpha)
            err = _fake_quant_error(centers, weights, lo, hi, bits, symmetric)
            if err < best_err:
                best, best_err = (float(lo), float(hi)), err
        return best


def _fake_quant_error(
    x: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> float:
    signed = P.activation_signed(lo, symmetric)
    scale, zp = P.choose_qparams(lo, hi, bits, symmetric=symmetric, signed=signed)
    qmin, qmax = P.qrange(bits, signed)
    err = (P.fake_quantize(x, scale, zp, qmin, qmax) - x).double().pow(2)
    return float((err * w).sum())


def mse_weight_range(w: torch.Tensor, bits: int, axis: int | None, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (or per-tensor) weight clipping range minimizing the squared error (used by ``mse``)."""
    flat = w.detach().reshape(w.shape[0], -1) if axis == 0 else w.detach().reshape(1, -1)
    lo0, hi0 = flat.min(dim=1).values, flat.max(dim=1).values
    best_lo, best_hi = lo0.clone(), hi0.clone()
    best_err = torch.full_like(lo0, float("inf"))
    for alpha in np.linspace(0.5, 1.0, 51):
        lo, hi = lo0 * float(alpha), hi0 * float(alpha)
        scale, zp = P.choose_qparams(lo, hi, bits, symmetric=symmetric, signed=True)
        qmin, qmax = P.qrange(bits, True)
        err = (P.fake_quantize(flat, scale, zp, qmin, qmax, axis=0) - flat).pow(2).sum(dim=1)
        better = err < best_err
        best_lo, best_hi, best_err = (
            torch.where(better, lo, best_lo),
            torch.where(better, hi, best_hi),
            torch.where(better, err, best_err),
        )
    if axis is None:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi


def _kl_threshold(counts: np.ndarray, levels: int) -> int:
    """Number of |x| histogram bins to keep so that quantizing them to ``levels`` bins loses least (KL).

    The first bin is left out of the divergence: it holds the exact zeros (half of a ReLU output),
    which every candidate represents exactly; counting that spike would push the search towards
    tiny thresholds that clip most of the range.
    """
    counts = counts.astype(np.float64).copy()
    counts[0] = 0.0
    n = len(counts)
    if n <= levels or counts.sum() == 0:
        return n
    best_i, best_kl = n, float("inf")
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        starts = np.linspace(0, i, levels + 1).astype(np.int64)
        nonzero = counts[:i] > 0
        sums = np.add.reduceat(counts[:i], starts[:-1])
        nz_per_group = np.add.reduceat(nonzero.astype(np.float64), starts[:-1])
        avg = np.where(nz_per_group > 0, sums / np.maximum(nz_per_group, 1.0), 0.0)
        q = np.repeat(avg, np.diff(starts)) * nonzero
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


OBSERVERS = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}
