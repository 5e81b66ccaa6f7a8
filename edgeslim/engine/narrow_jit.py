"""Stages 2 and 3 of ``narrow.narrow_acc`` as one compiled loop (numba), when numba imports: per output, the
sum of its blocks' bounds settles it, or its blocks are taken in order, each either added whole (when its
bounds keep the register in range) or walked tap by tap. The same tests and the same arithmetic as the numpy
stages, without their gathers and temporaries; ``NARROW_JIT = False`` in ``narrow`` runs the numpy stages.

``kernel()`` compiles on first use (a second or two; cached on disk where numba can write its cache) and returns
None where numba is missing, so the engine still runs on numpy alone.
"""

from __future__ import annotations

import math
import threading

__all__ = ["kernel", "settle_rows"]


def settle_rows(ul, c, w, B, lo, hi, wrap, out, events):
    """Registers of outputs (i, o) of a chunk of rows: ``ul`` (nb, n, 2O) the blocks' sums of positive (``u``,
    columns < O) and of negated negative terms (``l``), ``c`` (n, nb * B) the rows' taps, ``w`` (O, nb * B) the
    filters, all integers held exactly in a float type. Writes ``out`` (n, O) and adds each step whose partial
    sum left [lo, hi] to ``events[o]``. A computed ``u`` or ``l`` that is not exact is beyond 2**24, so beyond
    ``hi``: it fails its test whatever its rounding, as in the numpy stages."""
    nb, n, O2 = ul.shape
    O = O2 // 2
    span = float(hi - lo + 1)
    tot = ul[0].copy()                              # sums over the blocks, block after block (contiguous rows);
    for j in range(1, nb):                          # exact in float32 below 2**24, and a sum beyond fails anyway
        for i in range(n):
            for q in range(O2):
                tot[i, q] += ul[j, i, q]
    for i in range(n):
        for o in range(O):
            if tot[i, o] <= hi and tot[i, o + O] <= hi:  # stage 1: no partial sum leaves the range
                out[i, o] = tot[i, o] - tot[i, o + O]
                continue
            r = 0.0
            for j in range(nb):
                u = ul[j, i, o]
                lw = ul[j, i, o + O]
                if r + u <= hi and r - lw >= lo:
                    r += u - lw
                    continue
                for k in range(j * B, (j + 1) * B):
                    s = r + float(c[i, k]) * float(w[o, k])
                    if s > hi or s < lo:
                        events[o] += 1
                        if wrap:
                            s -= span * math.floor((s - lo) / span)
                        elif s > hi:
                            s = float(hi)
                        else:
                            s = float(lo)
                    r = s
            out[i, o] = r


_LOCK = threading.Lock()
_COMPILED: list = []


def kernel():
    """The compiled ``settle_rows`` (nogil: the engine's threads run it side by side), or None without numba."""
    with _LOCK:
        if not _COMPILED:
            try:
                import numba
            except Exception:  # missing, or broken (e.g. built for another numpy): the numpy stages
                _COMPILED.append(None)
            else:
                try:
                    _COMPILED.append(numba.njit(cache=True, nogil=True)(settle_rows))
                except Exception:  # no cache locator (read-only install): compile per process
                    _COMPILED.append(numba.njit(nogil=True)(settle_rows))
        return _COMPILED[0]
