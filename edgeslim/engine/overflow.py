"""Overflow statistics of integer convolutions / GEMMs (per layer and per output filter).

For every QLinearConv / QGemm the engine runs, ``OverflowStats`` counts, per output filter:

* ``product_int8``: the fraction of products ``(x - zx) * (w - zw)`` outside int8 [-128, 127], over all
  output pixels and all taps of the receptive field (zero-padding taps included: their product is 0);
* ``sum_int16``: the fraction of output pixels whose full receptive-field sum (bias excluded) is outside
  int16 [-32768, 32767];
* ``accumulator_overflows``: partial-sum overflow events of the chosen accumulator width (one event per
  accumulation step whose result did not fit the register, bias addition included).

Products are counted without materializing them: per tap ``k`` the product with a fixed weight ``w`` is
out of range iff ``d > floor(127 / w)`` or ``d < -floor(128 / w)`` (``w > 0``; mirrored for ``w < 0``), so a
cumulative histogram of the input values ``d`` per tap gives every filter's count by lookup.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_products_out_of_int8", "OverflowStats"]


def _below(cum: np.ndarray, dmin: int, v: np.ndarray) -> np.ndarray:
    """Number of inputs d < v per (filter, tap), from the cumulative histogram ``cum`` (K, V + 1)."""
    j = np.clip(v - dmin, 0, cum.shape[1] - 1)
    return np.take_along_axis(cum, j.T, axis=1).T


class _Layer:
    def __init__(self, out_channels: int) -> None:
        self.prod_out = np.zeros(out_channels, dtype=np.int64)
        self.prod_total = np.zeros(out_channels, dtype=np.int64)
        self.sum_out = np.zeros(out_channels, dtype=np.int64)
        self.sum_total = np.zeros(out_channels, dtype=np.int64)
        self.events = np.zeros(out_channels, dtype=np.int64)


_HIST_CHUNK = 1 << 16  # input values per bincount call of count_products_out_of_int8


def count_products_out_of_int8(cols: np.ndarray, wk: np.ndarray) -> np.ndarray:
    """cols (G, M, K) zero-point-corrected inputs, wk (G, O, K) weights -> (G, O) counts of
    products outside [-128, 127]."""
    G, M, K = cols.shape
    out = np.zeros(wk.shape[:2], dtype=np.int64)
    if M == 0:
        return out
    step = max(1, _HIST_CHUNK // max(K, 1))
    for g in range(G):
        c = cols[g]
        dmin, dmax = int(c.min()), int(c.max())
        V = dmax - dmin + 1
        offsets = np.arange(K, dtype=np.intp) * V - dmin      # tap k's values in bins [k V, (k + 1) V)
        hist = np.zeros(K * V, dtype=np.int64)
        for m0 in range(0, M, step):                          # rows in chunks: small temporaries, in cache
            idx = c[m0:m0 + step].astype(np.intp)
            idx += offsets
            hist += np.bincount(idx.ravel(), minlength=K * V)
        hist = hist.reshape(K, V)
        cum = np.concatenate([np.zeros((K, 1), np.int64), np.cumsum(hist, axis=1)], axis=1)  # cum[k, j]: d < dmin + j
        w = wk[g].astype(np.int64)
        a = np.abs(w)
        safe = np.maximum(a, 1)
        pos_hi = np.where(w > 0, 127 // safe, 128 // safe)   # out if d > pos_hi
        neg_lo = np.where(w > 0, 128 // safe, 127 // safe)   # out if d < -neg_lo
        n_out = (M - _below(cum, dmin, pos_hi + 1)) + _below(cum, dmin, -neg_lo)
        out[g] = np.where(w != 0, n_out, 0).sum(axis=1)
    return out


class OverflowStats:
    """Collects overflow counts while ``engine.run.run(..., stats=OverflowStats())`` executes."""

    def __init__(self) -> None:
        self._layers: dict[str, _Layer] = {}
        self.accumulator_bits: int | None = None

    def observer(self, name: str, out_channels: int):
        layer = self._layers.setdefault(name, _Layer(out_channels))

        def observe(cols: np.ndarray, wk: np.ndarray, acc: np.ndarray, events: np.ndarray) -> None:
            _, M, K = cols.shape
            layer.prod_out += count_products_out_of_int8(cols, wk).reshape(-1)
            layer.prod_total += M * K
            layer.sum_out += ((acc < -32768) | (acc > 32767)).sum(axis=1).reshape(-1)
            layer.sum_total += M
            layer.events += np.asarray(events, dtype=np.int64).reshape(-1)

        return observe

    def merge(self, other: OverflowStats) -> None:
        """Add ``other``'s counts (the same graph run on other inputs) to these, layer by layer."""
        for name, layer in other._layers.items():
            mine = self._layers.setdefault(name, _Layer(len(layer.events)))
            for field in ("prod_out", "prod_total", "sum_out", "sum_total", "events"):
                total = getattr(mine, field)
                np.add(total, getattr(layer, field), out=total)
        self.accumulator_bits = other.accumulator_bits if self.accumulator_bits is None else self.accumulator_bits

    def per_filter(self, name: str) -> dict[str, np.ndarray]:
        """Per output filter: fractions ``product_int8`` and ``sum_int16``, counts ``accumulator_overflows``."""
        layer = self._layers[name]
        return {
            "product_int8": layer.prod_out / np.maximum(layer.prod_total, 1),
            "sum_int16": layer.sum_out / np.maximum(layer.sum_total, 1),
            "accumulator_overflows": layer.events.copy(),
        }

    def layers(self) -> list[dict]:
        rows = []
        for name in self._layers:
            pf = self.per_filter(name)
            rows.append({
                "name": name,
                "product_int8": _summary(pf["product_int8"]),
                "sum_int16": _summary(pf["sum_int16"]),
                "accumulator_overflows": int(pf["accumulator_overflows"].sum()),
                "accumulator_bits": self.accumulator_bits,
            })
        return rows


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"avg": float(v.mean()), "max": float(v.max()), "min": float(v.min())}
