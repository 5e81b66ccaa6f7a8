"""Iterating over a data set in batches, picking calibration subsets, guarding against NaN.

Calibration subsets are seeded and sorted so that the same command picks the same images on
every run (quantization results are then reproducible) and reads them in file order.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
from tqdm import tqdm

from edgeslim.errors import EdgeslimError

__all__ = ["batches", "calibration_indices", "check_finite"]


class _Batchable(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def batch(self, indices) -> np.ndarray: ...


def batches(
    ds: _Batchable,
    batch_size: int,
    indices: np.ndarray | None = None,
    *,
    desc: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x N,C,H,W float32, y int64)`` over ``indices`` (default: all, in order).

    The next batch is decoded in a background thread while the caller works on the current
    one (decoding and inference overlap; both release the GIL). With ``desc`` a tqdm bar is
    shown on stderr, counting images.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise EdgeslimError(f"batch size {batch_size!r} is not a positive integer: pass e.g. 32")
    idx = np.arange(len(ds), dtype=np.int64) if indices is None else np.asarray(indices, np.int64).reshape(-1)
    chunks = [idx[a : a + batch_size] for a in range(0, len(idx), int(batch_size))]
    bar = tqdm(total=len(idx), desc=desc, unit="img", mininterval=0.5) if desc is not None else None
    pool = ThreadPoolExecutor(1)
    pending: Future | None = None
    try:
        for k, chunk in enumerate(chunks):
            x = (pending.result() if pending is not None else ds.batch(chunk))
            pending = pool.submit(ds.batch, chunks[k + 1]) if k + 1 < len(chunks) else None
            yield x, np.asarray(ds.labels[chunk], np.int64)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()


def calibration_indices(
    n_total: int, size: int, seed: int = 0, labels: np.ndarray | None = None
) -> np.ndarray:
    """Sorted, seeded random subset of ``range(n_total)`` without replacement.

    With ``labels`` the subset is class-balanced as far as possible: every class gets
    ``size // k`` images (the remainder goes to randomly chosen classes), and classes with too
    few images give their share to the others. ``size >= n_total`` returns every index
    (no error: a small set simply calibrates on all of it).
    """
    if isinstance(size, bool) or int(size) != size or size <= 0:
        raise EdgeslimError(f"calibration size {size!r} must be a positive integer: pass e.g. 512")
    if n_total <= 0:
        raise EdgeslimError("calibration data set is empty: pass a data set with images")
    size, n_total = int(size), int(n_total)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n_total:
            raise EdgeslimError(
                f"calibration labels have {len(labels)} entries for {n_total} images: pass one label per image"
            )
    if size >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(n_total, size, replace=False)).astype(np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = _balanced_quota(counts, size, rng)
    picked = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        if quota[c]:
            picked.append(rng.choice(members, quota[c], replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _balanced_quota(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class sample counts summing to ``size`` (< counts.sum()), as even as counts allow."""
    quota = np.zeros(len(counts), np.int64)
    remaining = size
    active = list(np.argsort(counts, kind="stable"))  # smallest classes first
    while active:
        share = remaining // len(active)
        small = [c for c in active if counts[c] <= share]
        if not small:
            break
        for c in small:  # these classes cannot fill a fair share: take all of them
            quota[c] = counts[c]
            remaining -= int(counts[c])
        active = [c for c in active if c not in small]
    if active:
        share, extra = divmod(remaining, len(active))
        quota[active] = share
        if extra:
            quota[rng.choice(np.asarray(active), extra, replace=False)] += 1
    return quota


def check_finite(x, where: str) -> None:
    """Raise if ``x`` holds NaN/inf: one bad input poisons every calibrated range downstream."""
    arr = np.asarray(x)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise EdgeslimError(f"NaN/inf in input batch from {where}: check the data and normalization")
