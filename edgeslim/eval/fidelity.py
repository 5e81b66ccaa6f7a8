"""Label-free scoring: how closely a quantized model's outputs follow the FP32 model's, per output.

* SQNR (dB): ``10 log10(sum(ref^2) / sum((ref - y)^2))`` over the whole output;
* cosine similarity of the flattened outputs, per input, averaged;
* the largest absolute error, also in units of the output's quantization step (LSB) when the output is
  dequantized from integer codes;
* top-1 agreement when the output holds class scores (``N x K``, K > 1): the fraction of inputs whose arg-max
  is the FP32 model's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["output_fidelity", "fidelity", "headline_db"]


def output_fidelity(ref: np.ndarray, y: np.ndarray, lsb: float | None = None) -> dict:
    ref, y = np.asarray(ref, np.float64), np.asarray(y, np.float64)
    if ref.shape != y.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {y.shape}")
    err = ref - y
    signal, noise = float((ref ** 2).sum()), float((err ** 2).sum())
    flat_r, flat_y = ref.reshape(len(ref), -1), y.reshape(len(y), -1)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_y, axis=1)
    cos = np.where(norms > 0, (flat_r * flat_y).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    out = {
        "shape": list(ref.shape[1:]),
        "sqnr_db": None if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf")),
        "identical": noise == 0,
        "cosine": float(cos.mean()),
        "max_abs_error": float(np.abs(err).max()) if err.size else 0.0,
    }
    if lsb:
        out["max_error_lsb"] = out["max_abs_error"] / lsb
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["top1_agreement"] = float((ref.argmax(1) == y.argmax(1)).mean())
    if out["sqnr_db"] is not None:
        out["sqnr_db"] = round(float(out["sqnr_db"]), 3) if np.isfinite(out["sqnr_db"]) else -999.0
    return out


def fidelity(refs: dict[str, np.ndarray], ys: dict[str, np.ndarray], lsbs: dict[str, float | None] | None = None) -> dict:
    """``output_fidelity`` for every output (same names in both dicts)."""
    lsbs = lsbs or {}
    return {name: output_fidelity(refs[name], ys[name], lsbs.get(name)) for name in refs}


def headline_db(per_output: dict[str, dict]) -> float | None:
    """The task's headline: the worst output's SQNR (None when every output is identical)."""
    values = [o["sqnr_db"] for o in per_output.values() if o["sqnr_db"] is not None]
    return min(values) if values else None
