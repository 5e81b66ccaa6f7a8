"""Accumulator registers of the integer engine: the exact sum fitted into a ``bits``-wide register, and the
narrow (e.g. 16-bit) register that saturates or wraps at every step of the receptive field, as an accelerator
with a narrow accumulator computes it (Ni et al., "WrapNet: Neural Net Inference with Ultra-Low-Resolution
Arithmetic", 2020; Colbert et al., "A2Q: Accumulator-Aware Quantization", 2023).

``gemm_acc`` takes zero-point-corrected operands (im2col columns and weights, ``ops.conv_acc`` / ``ops.gemm_int``
build them) and returns the register plus the per-filter count of overflow events; ``narrow_acc`` is its
tap-ordered narrow simulation, computed by blocks of taps with BLAS GEMMs instead of a Python step per tap:
bounds on the partial sums settle most outputs at once, and only the runs of taps where a register may reach
its range's end are taken tap by tap.
"""

from __future__ import annotations

import numpy as np

from . import narrow_jit

__all__ = ["gemm_type", "register", "gemm_acc", "narrow_acc", "NARROW_BLOCK", "NARROW_SEGMENTS", "NARROW_SPLIT",
           "NARROW_GEMM", "NARROW_CHUNK", "NARROW_WALK", "NARROW_JIT"]


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


NARROW_BLOCK = 48  # about this many taps per block of the GEMM stage of ``narrow_acc`` (K cut into equal blocks)
NARROW_SEGMENTS = 4  # runs of consecutive blocks tested together before the blocks themselves
NARROW_SPLIT = 8  # taps per sub-block when a block that may overflow is re-tested (0: walk the whole block)
# multiply-adds per GEMM call: small enough for its arrays to stay in cache and for OpenBLAS to run it on the
# calling thread (it spreads a GEMM over threads from m * n * k = 2**18 on; waking them for thousands of small
# calls costs more than the calls, and much more on a busy machine)
NARROW_GEMM = (1 << 18) - 1
NARROW_CHUNK = 1 << 15  # outputs per vectorized step of the GEMM stage (its arrays stay in cache)
NARROW_WALK = 1 << 17  # unsettled outputs taken through their blocks at once (bounds the memory of that step)
NARROW_JIT = True  # stages 2 and 3 as one compiled loop where numba imports (narrow_jit); False: the numpy stages


def narrow_acc(cols: np.ndarray, w: np.ndarray, bits: int, overflow: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``bits``-wide register after the taps of ``cols`` (G, M, K) x ``w`` (G, O, K) int64, accumulated in
    order (k = 0 .. K-1) with saturation or wrap-around at every step, bias not included: ((G, M, O) int64,
    (G, O) overflow events). Identical, values and event counts, to a loop over the taps.

    The test behind it: over a run of taps whose positive terms sum to ``u`` and whose negative terms sum to
    ``-l``, every partial sum started from register ``r`` lies in ``[r - l, r + u]``; when that interval is inside
    the register the run has no event and ends at ``r + u - l`` exactly, saturating or wrapping. Applied from the
    coarsest runs to the finest, each level on the outputs the previous one could not settle:

    1. one GEMM per block of about ``NARROW_BLOCK`` taps gives every output the ``u`` and ``l`` of each block
       (columns ``max(w, 0)`` and ``max(-w, 0)``); their sums over the receptive field settle the outputs whose
       register never leaves the range (most of them), at the exact sum;
    2. the others are tested on ``NARROW_SEGMENTS`` runs of consecutive blocks in order (the register before a run
       is then the sum of the runs before it), which settles most of the rest;
    3. the remaining ones go through their blocks in order, register in hand; a block that fails the test is
       re-tested by sub-blocks of ``NARROW_SPLIT`` taps (``u`` and ``l`` from its terms), and only the sub-blocks
       that fail are walked tap by tap, vectorized over the outputs concerned.

    Where numba imports (and ``NARROW_JIT``), stages 2 and 3 are one compiled loop over the outputs instead
    (``narrow_jit.settle_rows``: each unsettled output through its blocks, a block added whole when it passes the
    test, walked tap by tap when not): same tests, same exact results, without the gathers of the numpy stages.

    The GEMMs run in float32 when every product, plus a register, is below 2**24 (float64 otherwise): ``u`` and
    ``l`` are sums of non-negative integers, so a computed sum small enough to pass a test was exact, and one that
    is not fails it whatever its rounding.
    """
    G, M, K = cols.shape
    O = w.shape[1]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = np.zeros((G, M, O), dtype=np.int64)
    events = np.zeros((G, O), dtype=np.int64)
    if not (G and M and O and K):
        return out, events
    cmin, cmax = float(cols.min()), float(cols.max())
    amax = max(abs(cmin), abs(cmax))
    wabs = np.abs(w)
    reach = amax * float(wabs.sum(axis=2).max())  # bound on every partial sum
    if reach >= 1 << 52:
        raise ValueError("narrow accumulator: operands too large for exact float arithmetic")
    if reach <= hi:  # no partial sum can leave the register: the plain sum (exact in float32 below 2**24)
        ftype = np.float32 if cols.dtype == np.float32 and reach < 1 << 24 else np.float64
        acc = np.matmul(cols.astype(ftype, copy=False), w.astype(ftype).transpose(0, 2, 1))
        return acc.astype(np.int64), events
    # float32 holds every integer below 2**24 exactly: products, and a register plus a product, are exact there
    ftype = np.float32 if amax * float(wabs.max()) + (1 << bits) < 1 << 24 else np.float64
    split = max(1, min(NARROW_SPLIT, K))
    nb = -(-K // NARROW_BLOCK)
    B = split * -(-K // (nb * split))             # nb blocks of B taps, B a multiple of ``split``
    wpad = np.zeros((G, O, nb * B), dtype=ftype)
    wpad[:, :, :K] = w  # zero taps leave the register (in range) unchanged: no event
    fit = _Register(lo, hi, bits, overflow)
    for g in range(G):
        if nb * B == K:
            c = np.ascontiguousarray(cols[g], dtype=ftype)
        else:
            c = np.zeros((M, nb * B), dtype=ftype)
            c[:, :K] = cols[g]
        events[g] = _narrow_rows(c, wpad[g], fit, B, cmin < 0, out[g])
    return out, events


class _Register:
    """The narrow register: its range, how a partial sum is fitted into it, and the tests of runs of taps."""

    def __init__(self, lo: int, hi: int, bits: int, overflow: str):
        self.lo, self.hi, self.bits, self.overflow = lo, hi, bits, overflow

    def outside(self, r: np.ndarray, u: np.ndarray, l: np.ndarray) -> np.ndarray:
        """Indices of the registers ``r`` whose run (``u``, ``l``) may leave the range: r + u > hi or r - l < lo."""
        a = r + u
        a -= self.hi
        b = r - l
        np.subtract(self.lo, b, out=b)
        np.maximum(a, b, out=a)
        return np.flatnonzero(a > 0)

    def walk(self, r: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Registers ``r`` (n,) through terms ``t`` (taps, n) one tap at a time: (registers, events (n,))."""
        seen = np.empty_like(t)                    # partial sum before it is fitted into the register
        reg = np.empty_like(t)
        prev = r
        for k in range(len(t)):
            np.add(prev, t[k], out=seen[k])
            if self.overflow == "saturate":
                np.maximum(seen[k], self.lo, out=reg[k])
                np.minimum(reg[k], self.hi, out=reg[k])
            else:  # seen - 2**bits * floor((seen - lo) / 2**bits), exact (np.remainder is ~25x slower)
                np.subtract(seen[k], self.lo, out=reg[k])
                reg[k] *= 1.0 / (1 << self.bits)
                np.floor(reg[k], out=reg[k])
                reg[k] *= -(1 << self.bits)
                reg[k] += seen[k]
            prev = reg[k]
        return prev.copy(), np.count_nonzero(seen != reg, axis=0)

    def runs(self, r: np.ndarray, u: np.ndarray, l: np.ndarray, terms) -> tuple[np.ndarray, np.ndarray]:
        """Registers ``r`` (n,) through consecutive runs of taps, run ``j`` summed up by ``u[j]`` and ``l[j]``
        (n,): a run that passes the test adds ``u - l``; the registers ``f`` that fail it go through the run's
        terms ``terms(j, f)`` ((taps, len(f))) by ``refine``. (registers, events (n,))."""
        r = r.copy()
        ev = np.zeros(len(r), dtype=np.int64)
        for j in range(len(u)):
            f = self.outside(r, u[j], l[j])
            start = r[f]
            r += u[j]
            r -= l[j]
            if len(f):
                r[f], e = self.refine(start, terms(j, f))
                ev[f] += e
        return r, ev

    def refine(self, r: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Registers ``r`` (n,) through terms ``t`` (taps, n): by sub-blocks of ``NARROW_SPLIT`` taps (each tested,
        the failing ones walked), or tap by tap when ``t`` is no longer than that."""
        B, n = t.shape
        split = NARROW_SPLIT
        if split <= 0 or B <= split or B % split:
            return self.walk(r, t)
        t3 = t.reshape(B // split, split, n)
        u = np.maximum(t3, 0).sum(axis=1)         # sums of non-negative terms: exact when they pass the test
        l = np.minimum(t3, 0).sum(axis=1)
        np.negative(l, out=l)
        return self.runs(r, u, l, lambda j, f: np.take(t3[j], f, axis=1))


def _block_weights(w: np.ndarray, nb: int, B: int, signed: bool) -> np.ndarray:
    """GEMM operand (nb, kB, 2O) of block ``j``: output columns ``u`` then ``l``. Unsigned inputs (kB = B):
    rows ``max(w, 0)`` | ``max(-w, 0)``; signed ones (kB = 2B, the input split into ``max(c, 0)`` then
    ``max(-c, 0)``): the second half of the rows swaps them."""
    O = w.shape[0]
    wb = np.concatenate([np.maximum(w, 0), np.maximum(-w, 0)], axis=0).reshape(2 * O, nb, B).transpose(1, 2, 0)
    if signed:
        wb = np.concatenate([wb, np.concatenate([wb[:, :, O:], wb[:, :, :O]], axis=2)], axis=1)
    return np.ascontiguousarray(wb)


def _narrow_rows(c: np.ndarray, w: np.ndarray, fit: _Register, B: int, signed: bool, out: np.ndarray) -> np.ndarray:
    """``narrow_acc`` for one group: c (M, K), K a multiple of ``B``; w (O, K), both in the GEMM's float type.
    Writes the registers into ``out`` (M, O) and returns the events (O,)."""
    M, O = c.shape[0], w.shape[0]
    events = np.zeros(O, dtype=np.int64)
    reg = np.empty((M, O), dtype=c.dtype)
    chunks = _block_bounds(c, w, B, signed)
    jit = narrow_jit.kernel() if NARROW_JIT else None
    if jit is None:
        _numpy_stages(c, w, fit, B, chunks, reg, events)
    else:
        for m0, n, ul in chunks:
            # contiguous operands (a copy of the last, shorter step's bounds): one compiled signature per float type
            jit(np.ascontiguousarray(ul[:, :n]), c[m0:m0 + n], w, B, fit.lo, fit.hi, fit.overflow == "wrap",
                reg[m0:m0 + n], events)
    np.copyto(out, reg, casting="unsafe")          # exact integers
    return events


def _block_bounds(c: np.ndarray, w: np.ndarray, B: int, signed: bool):
    """Stage 1's GEMMs, a step of rows at a time: yields ``(m0, n, ul)``, ``ul[:, :n]`` (nb, n, 2O) the sums ``u``
    (columns < O) and ``l`` of each block of taps of rows ``m0 .. m0 + n`` (``ul`` is reused by the next step)."""
    M, K = c.shape
    O = w.shape[0]
    nb = K // B
    wb = _block_weights(w, nb, B, signed)[:, None]  # (nb, 1, kB, 2O): broadcast over the BLAS calls
    kB = wb.shape[2]
    sub = max(1, NARROW_GEMM // (2 * O * kB))     # rows per BLAS call
    rows = sub * max(1, NARROW_CHUNK // (sub * O))  # rows per vectorized step
    lhs = np.zeros((nb, rows, kB), dtype=c.dtype)  # signed inputs, and a last step of fewer rows
    ul = np.empty((nb, rows, 2 * O), dtype=c.dtype)
    for m0 in range(0, M, rows):
        n = min(M, m0 + rows) - m0
        ns = -(-n // sub) * sub                    # rows of whole BLAS calls
        cv = c[m0:m0 + n].reshape(n, nb, B).transpose(1, 0, 2)  # (nb, n, B), a view
        if signed or ns != n:
            if signed:
                np.maximum(cv, 0, out=lhs[:, :n, :B])
                np.minimum(cv, 0, out=lhs[:, :n, B:])
                np.negative(lhs[:, :n, B:], out=lhs[:, :n, B:])
            else:
                lhs[:, :n] = cv
            lhs[:, n:ns] = 0
            cv = lhs[:, :ns]
        np.matmul(cv.reshape(nb, ns // sub, sub, kB), wb, out=ul[:, :ns].reshape(nb, ns // sub, sub, 2 * O))
        yield m0, n, ul


def _numpy_stages(c: np.ndarray, w: np.ndarray, fit: _Register, B: int, chunks, reg: np.ndarray,
                  events: np.ndarray) -> None:
    """Stages 1-3 of ``narrow_acc`` in numpy over the steps ``chunks`` (``_block_bounds``) yields: writes the
    registers into ``reg`` (M, O) and adds the events to ``events`` (O,)."""
    M, K = c.shape
    O = w.shape[0]
    nb = K // B
    nseg = max(1, min(nb, NARROW_SEGMENTS))
    bounds = np.linspace(0, nb, nseg + 1).round().astype(int)
    c_rows = c.reshape(M * nb, B)                  # row m * nb + j: the taps of block j of output row m
    w_rows = w.reshape(O * nb, B)
    pending: list[tuple] = []                      # (flat output indices, their blocks' u and l (nb, n))

    def settle() -> None:
        """Stage 3 for the pending outputs: through their blocks in order."""
        idx = np.concatenate([p[0] for p in pending])
        mi, oi = np.divmod(idx, O)

        def terms(j, f):                           # (B, len(f)): the terms of block j of outputs f
            t = np.take(c_rows, mi[f] * nb + j, axis=0)
            t *= np.take(w_rows, oi[f] * nb + j, axis=0)
            return np.ascontiguousarray(t.T)
        r, ev = fit.runs(np.zeros(len(idx), dtype=c.dtype), np.concatenate([p[1] for p in pending], axis=1),
                         np.concatenate([p[2] for p in pending], axis=1), terms)
        reg.reshape(-1)[idx] = r
        events[:] += np.bincount(oi, weights=ev, minlength=O).astype(np.int64)
        pending.clear()

    n_pending = 0
    for m0, n, ul in chunks:
        seg = _sum_runs(ul[:, :n], bounds)         # (nseg, n, 2O)
        tot = _sum_runs(seg, [0, nseg])[0]
        U, L = tot[:, :O], tot[:, O:]
        np.subtract(U, L, out=reg[m0:m0 + n])
        f = np.flatnonzero(np.maximum(U, L) > fit.hi)  # stage 1 (l = hi + 1 = -lo would still be inside)
        if len(f) and nseg > 1:
            f = f[_prefix_bad(seg, f, fit)]       # stage 2
        if len(f):
            mi, oi = np.divmod(f, O)
            pos = mi * (2 * O) + oi
            flat = ul.reshape(nb, -1)
            pending.append((f + m0 * O, np.take(flat, pos, axis=1), np.take(flat, pos + O, axis=1)))
            n_pending += len(f)
            if n_pending >= NARROW_WALK:
                settle()
                n_pending = 0
    if pending:
        settle()


def _sum_runs(a: np.ndarray, bounds) -> np.ndarray:
    """Sums over axis 0 of ``a`` between consecutive ``bounds`` (``a`` itself when every run is one entry)."""
    if len(bounds) == len(a) + 1:
        return a
    out = np.empty((len(bounds) - 1,) + a.shape[1:], dtype=a.dtype)
    for k in range(len(bounds) - 1):
        b0, b1 = bounds[k], bounds[k + 1]
        if b1 - b0 == 1:
            out[k] = a[b0]
            continue
        np.add(a[b0], a[b0 + 1], out=out[k])
        for j in range(b0 + 2, b1):
            out[k] += a[j]
    return out


def _prefix_bad(s: np.ndarray, f: np.ndarray, fit: _Register) -> np.ndarray:
    """Which of the outputs ``f`` (flat (row, filter) indices) may leave the register in one of the runs of taps
    summed up by ``s`` (runs, rows, 2O: u then l), the runs in order and the register before each the sum of the
    runs before it (as it is while none leaves the range): a boolean mask over ``f``."""
    ns, n, O2 = s.shape
    O = O2 // 2
    mi, oi = np.divmod(f, O)
    pos = mi * O2 + oi
    top = s[0].reshape(-1)[pos]                    # the highest partial sum so far
    p = s[0].reshape(-1)[pos + O]
    bottom = np.negative(p)                        # the lowest
    np.subtract(top, p, out=p)                     # the register after the runs so far
    t = np.empty_like(p)
    for j in range(1, ns):
        u, l = s[j].reshape(-1)[pos], s[j].reshape(-1)[pos + O]
        np.add(p, u, out=t)
        np.maximum(top, t, out=top)
        np.subtract(p, l, out=t)
        np.minimum(bottom, t, out=bottom)
        p += u
        p -= l
    return (top > fit.hi) | (bottom < fit.lo)
