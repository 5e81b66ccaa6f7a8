"""Accumulator registers of the integer engine: the exact sum fitted into a ``bits``-wide register, and the
narrow (e.g. 16-bit) register that saturates or wraps at every step of the receptive field, as an accelerator
with a narrow accumulator computes it (Ni et al., "WrapNet: Neural Net Inference with Ultra-Low-Resolution
Arithmetic", 2020; Colbert et al., "A2Q: Accumulator-Aware Quantization", 2023).

``gemm_acc`` takes zero-point-corrected operands (im2col columns and weights, ``ops.conv_acc`` / ``ops.gemm_int``
build them) and returns the register plus the per-filter count of overflow events; ``narrow_acc`` is its
tap-ordered narrow simulation, computed by blocks of taps with BLAS GEMMs instead of a Python step per tap.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gemm_type", "register", "gemm_acc", "narrow_acc", "NARROW_BLOCK", "NARROW_GEMM", "NARROW_CHUNK",
           "NARROW_WALK"]


def gemm_type(bound: int):
    """The narrowest type whose GEMM is exact when every partial sum (in any order) is at most ``bound`` in
    magnitude: float32 below 2**24, float64 below 2**53 (every integer there is exactly representable, so every
    product and sum is exact), int64 otherwise (numpy's integer matmul: no BLAS, slow, exact below 2**63)."""
    if bound < 1 << 24:
        return np.float32
    return np.float64 if bound < 1 << 53 else np.int64


def register(acc: np.ndarray, bits: int, overflow: str) -> tuple[np.ndarray, np.ndarray]:
    """Fit a (wide) partial sum into a ``bits`` register: (value, overflowed mask)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    over = (acc < lo) | (acc > hi)
    if overflow == "saturate":
        return np.clip(acc, lo, hi), over
    if overflow == "wrap":
        return ((acc - lo) & ((1 << bits) - 1)) + lo, over
    raise ValueError(f"unknown overflow mode {overflow!r}: use 'saturate' or 'wrap'")


def gemm_acc(cols: np.ndarray, wk: np.ndarray, bias: np.ndarray | None = None, *, accumulator_bits: int = 32,
             overflow: str = "saturate") -> tuple[np.ndarray, np.ndarray]:
    """Integer GEMM of zero-point-corrected operands: ``cols`` (G, M, K), ``wk`` (G, O, K) -> (G, M, O).

    Returns (accumulator with bias, per-(G, O) count of register overflow events). 32 bits: exact int64
    sum (a GEMM in ``gemm_type`` of its bound) then fitted once into the register. Fewer bits: the result of
    accumulating the receptive field tap by tap in that register (saturating or wrapping at each step,
    one event per step whose partial sum left the range), then adding the bias (one more step); see
    ``narrow_acc`` for how that is computed without a Python step per tap.
    """
    G, M, K = cols.shape
    O = wk.shape[1]
    b = None if bias is None else np.asarray(bias, dtype=np.int64).reshape(G, 1, O)
    if accumulator_bits >= 32:
        amax = max(abs(int(cols.max())), abs(int(cols.min()))) if cols.size else 0
        ftype = gemm_type(amax * int(np.abs(np.asarray(wk, dtype=np.int64)).sum(axis=2).max(initial=0)))
        acc = np.matmul(cols.astype(ftype, copy=False), wk.astype(ftype).transpose(0, 2, 1)).astype(np.int64)
        if b is not None:
            acc = acc + b
        acc, over = register(acc, accumulator_bits, overflow)
        return acc, over.sum(axis=1)
    if overflow not in ("saturate", "wrap"):
        raise ValueError(f"unknown overflow mode {overflow!r}: use 'saturate' or 'wrap'")
    reg, events = narrow_acc(cols, np.asarray(wk, dtype=np.int64), accumulator_bits, overflow)
    if b is not None:
        lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
        reg = reg + b
        events += ((reg < lo) | (reg > hi)).sum(axis=1)
        reg, _ = register(reg, accumulator_bits, overflow)
    return reg, events


NARROW_BLOCK = 16  # taps per block of the narrow-accumulator simulation (``narrow_acc``)
# multiply-adds per GEMM call of its block loop: small enough for its arrays to stay in cache and for OpenBLAS to
# run it on the calling thread (it spreads a GEMM over threads from m * n * k = 2**18 on; waking them for
# thousands of small calls costs more than the calls, and much more on a busy machine)
NARROW_GEMM = (1 << 18) - 1
NARROW_CHUNK = 1 << 15  # outputs per vectorized step of the block loop (its float32 arrays stay in cache)
NARROW_WALK = 1 << 17  # flagged outputs walked tap by tap at once (bounds the memory of that step)


def narrow_acc(cols: np.ndarray, w: np.ndarray, bits: int, overflow: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``bits``-wide register after the taps of ``cols`` (G, M, K) x ``w`` (G, O, K) int64, accumulated in
    order (k = 0 .. K-1) with saturation or wrap-around at every step, bias not included: ((G, M, O) int64,
    (G, O) overflow events). Identical, values and event counts, to a loop over the taps.

    By blocks of ``NARROW_BLOCK`` taps: one GEMM gives, per output, the block's sum ``d`` and the sum ``u`` of its
    positive terms (``l = u - d``: minus the sum of its negative terms). Every partial sum inside the block lies
    in ``[r - l, r + u]`` (``r``: the register before it), so an output with ``r + u <= hi`` and ``r - l >= lo``
    has no event in the block and ends it at ``r + d``, exactly, saturating or wrapping. Only the outputs that
    fail the test (a few percent of the blocks of ResNet-20 at 16 bits) walk the block tap by tap, vectorized
    over those outputs.
    """
    G, M, K = cols.shape
    O = w.shape[1]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = np.zeros((G, M, O), dtype=np.int64)
    events = np.zeros((G, O), dtype=np.int64)
    if not (G and M and O and K):
        return out, events
    amax = max(abs(float(cols.min())), abs(float(cols.max())))
    wabs = np.abs(w)
    reach = amax * float(wabs.sum(axis=2).max())  # bound on every partial sum
    if reach >= 1 << 52:
        raise ValueError("narrow accumulator: operands too large for exact float arithmetic")
    if reach <= hi:  # no partial sum can leave the register: the plain sum (exact in float32 below 2**24)
        ftype = np.float32 if cols.dtype == np.float32 and reach < 1 << 24 else np.float64
        acc = np.matmul(cols.astype(ftype, copy=False), w.astype(ftype).transpose(0, 2, 1))
        return acc.astype(np.int64), events
    B = min(NARROW_BLOCK, K)
    nb = -(-K // B)
    wpad = np.zeros((G, O, nb * B), dtype=np.int64)
    wpad[:, :, :K] = w  # zero taps leave the register (in range) unchanged: no event
    wblock = float(np.abs(wpad).reshape(G, O, nb, B).sum(axis=3).max())
    # float32 holds every integer below 2**24 exactly: block sums, registers and products are exact there
    ftype = np.float32 if amax * wblock + (1 << bits) < 1 << 24 else np.float64
    stype = np.float32 if amax * float(wabs.max()) + (1 << bits) < 1 << 24 else np.float64
    for g in range(G):
        if nb * B == K:
            c = np.ascontiguousarray(cols[g], dtype=ftype)
        else:
            c = np.zeros((M, nb * B), dtype=ftype)
            c[:, :K] = cols[g]
        out[g], events[g] = _narrow_rows(c, wpad[g], lo, hi, bits, overflow, B, ftype, stype)
    return out, events


def _narrow_rows(c: np.ndarray, w: np.ndarray, lo: int, hi: int, bits: int, overflow: str, B: int,
                 ftype, stype) -> tuple[np.ndarray, np.ndarray]:
    """``narrow_acc`` for one group: c (M, K), K a multiple of ``B``; w (O, K) int64."""
    M, K = c.shape
    O = w.shape[0]
    nb = K // B
    below = np.full((M, O), -lo, dtype=ftype)      # register - lo (exact until a block test fails, then rewritten)
    events = np.zeros(O, dtype=np.int64)
    wf = w.astype(ftype).T                         # (K, O)
    wpos = np.maximum(wf, 0)
    signed = bool(c.min() < 0)
    if signed:  # GEMM on (max(c, 0), max(-c, 0)) interleaved per tap: u = c+ w+ + c- w-, d = c+ w - c- w
        cg = np.empty((M, K, 2), dtype=ftype)
        np.maximum(c, 0, out=cg[:, :, 0])
        np.maximum(-c, 0, out=cg[:, :, 1])
        cg = cg.reshape(M, 2 * K)
    kg = 2 * B if signed else B
    sub = max(1, NARROW_GEMM // (2 * O * kg))     # rows per BLAS call
    rows = sub * max(1, NARROW_CHUNK // (sub * O))  # rows per vectorized step
    c_rows = c.reshape(M * nb, B)                  # row m * nb + j: the taps of block j of output row m
    w_rows = np.ascontiguousarray(w.reshape(O * nb, B), dtype=stype)

    def walk(flagged: list, terms: list) -> None:
        """The flagged outputs (flat indices) through their block's terms (B, n each), tap by tap."""
        idx = np.concatenate(flagged)
        t = np.concatenate(terms, axis=1, out=np.empty((B, len(idx)), dtype=stype))  # C order: rows are taps
        seen = np.empty_like(t)                    # partial sum before it is fitted into the register
        reg = np.empty_like(t)
        prev = (below.reshape(-1)[idx] - t.sum(axis=0, dtype=ftype) + lo).astype(stype)  # register before the block
        for k in range(B):
            np.add(prev, t[k], out=seen[k])
            if overflow == "saturate":
                np.clip(seen[k], lo, hi, out=reg[k])
            else:  # seen - 2**bits * floor((seen - lo) / 2**bits), exact (np.remainder is ~25x slower)
                np.subtract(seen[k], lo, out=reg[k])
                reg[k] *= 1.0 / (1 << bits)
                np.floor(reg[k], out=reg[k])
                reg[k] *= -(1 << bits)
                reg[k] += seen[k]
            prev = reg[k]
        below.reshape(-1)[idx] = prev - lo
        n_ev = np.count_nonzero(seen != reg, axis=0)
        events[:] += np.bincount(idx % O, weights=n_ev, minlength=O).astype(np.int64)
        flagged.clear()
        terms.clear()

    for j in range(nb):
        s, e = j * B, (j + 1) * B
        if signed:
            wt = np.empty((B, 2, 2 * O), dtype=ftype)
            wt[:, 0, :O], wt[:, 0, O:] = wpos[s:e], wf[s:e]
            wt[:, 1, :O], wt[:, 1, O:] = wpos[s:e] - wf[s:e], -wf[s:e]
            wt, cs = wt.reshape(2 * B, 2 * O), cg[:, 2 * s:2 * e]
        else:
            wt, cs = np.concatenate([wpos[s:e], wf[s:e]], axis=1), c[:, s:e]
        flagged, terms, pending = [], [], 0
        for m0 in range(0, M, rows):
            m1 = min(M, m0 + rows)
            if (m1 - m0) % sub == 0:               # one numpy call, one BLAS call per ``sub`` rows
                ud = np.matmul(cs[m0:m1].reshape(-1, sub, kg), wt).reshape(m1 - m0, 2 * O)
            else:
                ud = np.concatenate([cs[q:min(m1, q + sub)] @ wt for q in range(m0, m1, sub)])
            u, d = ud[:, :O], ud[:, O:]            # block sum of the positive terms, block sum
            bl = below[m0:m1]
            room = (hi - lo) - bl                  # r + u > hi  <=>  u > hi - r
            bl += d                                # r - l < lo  <=>  u > r + d - lo
            f = np.flatnonzero(u > np.minimum(room, bl, out=room))
            if len(f):
                mi, oi = np.divmod(f, O)
                flagged.append(f + m0 * O)
                t = np.take(c_rows, (mi + m0) * nb + j, axis=0).astype(stype, copy=False)  # rows still in cache
                t *= np.take(w_rows, oi * nb + j, axis=0)
                terms.append(t.T)
                pending += len(f)
                if pending >= NARROW_WALK:
                    walk(flagged, terms)
                    pending = 0
        if flagged:
            walk(flagged, terms)
    return below.astype(np.int64) + lo, events
