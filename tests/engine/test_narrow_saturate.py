"""``narrow.narrow_acc`` (the narrow accumulator of the integer engine) against a plain tap-by-tap register, on
random and adversarial operands: registers pinned at either end of the range for long runs, swinging from one
end to the other inside a block, partial sums landing exactly on the ends, signed and unsigned columns, K not a
multiple of the block, groups; with the block, segment and sub-block sizes varied so that every level of its
tests (whole receptive field, runs of blocks, blocks, sub-blocks, single taps) decides some outputs; each case
twice, with stages 2 and 3 in numpy and as the compiled loop (``narrow_jit``, where numba imports).
Register values and per-filter overflow event counts must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.engine import narrow, narrow_jit


def tap_loop(cols, w, bits, overflow, ends=None):
    """The oracle: every output's register, one tap after the other in order k = 0 .. K-1; an event is a step
    whose partial sum left [lo, hi], after which the register saturates or wraps. ``ends`` (a list): gets, per
    output, whether its register sat at hi, and at lo, after some step."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    c, wk = np.asarray(cols).astype(np.int64), np.asarray(w).astype(np.int64)
    G, M, K = c.shape
    reg = np.zeros((G, M, wk.shape[1]), dtype=np.int64)
    events = np.zeros((G, wk.shape[1]), dtype=np.int64)
    at_hi, at_lo = np.zeros(reg.shape, dtype=bool), np.zeros(reg.shape, dtype=bool)
    for k in range(K):
        s = reg + c[:, :, k, None] * wk[:, None, :, k]
        events += ((s < lo) | (s > hi)).sum(axis=1)
        reg = np.clip(s, lo, hi) if overflow == "saturate" else (s - lo) % (1 << bits) + lo
        at_hi |= reg == hi
        at_lo |= reg == lo
    if ends is not None:
        ends += [at_hi, at_lo]
    return reg, events


def _random(rng, G, M, O, K, signed):
    """ReLU-like (unsigned, many zeros) or signed 8-bit columns, weights leaning positive."""
    if signed:
        cols = rng.integers(-128, 128, (G, M, K))
    else:
        cols = rng.integers(0, 256, (G, M, K)) * (rng.random((G, M, K)) < 0.6)
    return cols.astype(np.float32), rng.integers(-64, 128, (G, O, K))


def _pinned(rng, M, K, sign):
    """Rows of large activations against filters whose first two thirds are all ``sign``: the register reaches
    that end of the range within a few taps and stays there (an event per tap) until the mixed last third."""
    cols = rng.integers(150, 256, (1, M, K)).astype(np.float32)
    w = np.empty((1, 6, K), dtype=np.int64)
    head = 2 * K // 3
    w[:, :, :head] = sign * rng.integers(60, 128, (1, 6, head))
    w[:, :, head:] = rng.integers(-127, 128, (1, 6, K - head))
    w[:, 0, head:] = -sign * rng.integers(0, 4, K - head)   # filter 0 creeps back from the rail
    return cols, w


def _swings(rng, M, K, run):
    """Runs of ``run`` taps of one sign then the other: the register goes from one end to the other and back,
    both ends inside one block when ``run`` is shorter than a block."""
    cols = rng.integers(200, 256, (1, M, K)).astype(np.float32)
    sign = np.where((np.arange(K) // run) % 2 == 0, 1, -1)
    w = sign * rng.integers(100, 128, (1, 4, K))
    return cols, w


def _exact_ends():
    """Partial sums landing exactly on hi and lo (no event) and one past them (an event), on one column of ones
    (so the weights are the terms) and on a column of twos."""
    hi, lo = 32767, -32768
    terms = [[hi, 0, 1, -1, -hi, lo, 0, -1, 1, 5, 32767, -2],   # hi, hi+1 -> hi, ..., lo, lo-1 -> lo, ...
             [16383, 16384, 0, -32767, -32768, -1, 2, 0, 0, 0, 0, 0],
             [1] * 12,
             [-30000, -2768, 0, -1, 1, 32767, 0, 0, 0, 0, 0, 32767]]
    w = np.array(terms, dtype=np.int64)[None]
    cols = np.ones((1, 3, 12), dtype=np.float32)
    cols[0, 1] = 2                                             # doubled terms: beyond the ends more often
    cols[0, 2, ::2] = 0
    return cols, w


LEVELS = [  # NARROW_BLOCK, NARROW_SEGMENTS, NARROW_SPLIT
    (48, 4, 8),    # the defaults
    (8, 2, 2),     # small blocks, two segments, sub-blocks of two taps
    (12, 3, 0),    # blocks walked whole
    (16, 1, 4),    # no segment level
    (5, 6, 8),     # blocks shorter than a sub-block
]


pytestmark = pytest.mark.usefixtures("narrow_stages")  # every test with both stages (conftest.py)


DEFAULT_JIT = narrow.NARROW_JIT  # before any fixture sets it


def test_numba_is_used_by_default_where_it_imports():
    pytest.importorskip("numba")
    assert DEFAULT_JIT and narrow_jit.kernel() is not None


@pytest.fixture(params=LEVELS, ids=lambda p: "block%d-seg%d-split%d" % p)
def levels(request, monkeypatch):
    block, segments, split = request.param
    monkeypatch.setattr(narrow, "NARROW_BLOCK", block)
    monkeypatch.setattr(narrow, "NARROW_SEGMENTS", segments)
    monkeypatch.setattr(narrow, "NARROW_SPLIT", split)
    return request.param


def _check(cols, w, bits=16, overflow="saturate"):
    want = tap_loop(cols, w, bits, overflow)
    got = narrow.narrow_acc(cols, np.asarray(w, dtype=np.int64), bits, overflow)
    assert got[0].dtype == np.int64 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    return want


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("shape", [(1, 300, 7, 144), (1, 64, 16, 27), (2, 90, 5, 100), (3, 40, 2, 9),
                                   (1, 120, 9, 301)], ids=lambda s: "x".join(map(str, s)))
def test_random_columns(levels, shape, overflow):
    G, M, O, K = shape
    rng = np.random.default_rng([*shape, len(overflow), *levels])
    for signed in (False, True):
        cols, w = _random(rng, G, M, O, K, signed)
        want = _check(cols, w, 16, overflow)
        if K >= 100:
            assert want[1].sum() > 0  # the case does overflow
        _check(cols, w, 12, overflow)


@pytest.mark.parametrize("sign", [1, -1], ids=["high", "low"])
def test_registers_pinned_at_an_end(levels, sign):
    rng = np.random.default_rng([7, sign + 1, *levels])
    cols, w = _pinned(rng, 50, 130, sign)
    _check(cols, w)
    ends = []
    _, events = tap_loop(cols, w, 16, "saturate", ends)
    assert ends[0 if sign > 0 else 1].all() and (events >= 50 * 40).all()  # about an event per tap while pinned


@pytest.mark.parametrize("run", [3, 10, 40])
def test_swings_between_the_ends(levels, run):
    rng = np.random.default_rng([run, *levels])
    cols, w = _swings(rng, 30, 157, run)
    _check(cols, w)
    _check(cols, w, overflow="wrap")
    ends = []
    tap_loop(cols, w, 16, "saturate", ends)
    assert (ends[0] & ends[1]).mean() > 0.5      # most registers sat at both ends


def test_partial_sums_exactly_at_the_ends(levels):
    cols, w = _exact_ends()
    reg, events = _check(cols, w)
    # filter 0 by hand. Ones: 32767, 32767, 32768 (event) -> 32767, 32766, -1, -32769 (event) -> -32768, -32768,
    # -32769 (event) -> -32768, -32767, -32762, 5, 3. Twos: 65534 (event) -> 32767, 32767, 32769 (event), 32765,
    # -32769 (event), -98304 (event) -> -32768, -32768, -32770 (event), -32766, -32756, 32778 (event), 32763.
    # Odd taps only: 0, -1, -32769 (event), -32769 (event) -> -32768, -32763, -32765.
    np.testing.assert_array_equal(reg[0, :, 0], [3, 32763, -32765])
    assert events[0, 0] == 3 + 6 + 2 and reg[0, 0, 2] == 12
    _check(cols, w, overflow="wrap")


def test_sparse_overflows_among_small_terms(levels):
    """Mostly small terms with a rare huge one: the whole-field test fails for few outputs, each once."""
    rng = np.random.default_rng([11, *levels])
    cols = rng.integers(0, 8, (1, 200, 96)).astype(np.float32)
    w = rng.integers(-8, 9, (1, 6, 96))
    cols[0, ::17, 40] = 255
    w[0, :3, 40] = 127
    w[0, 3:, 40] = -127
    cols[0, ::17, 41] = 255
    w[0, :, 41] = np.array([127, 127, 127, -127, -127, -127])
    reg, events = _check(cols, w)
    quiet = np.ones(200, dtype=bool)
    quiet[::17] = False
    assert events.min() > 0 and np.abs(reg[0, quiet]).max() < 1 << 14


def test_step_sizes(monkeypatch):
    """Row steps of a few BLAS calls (the last one uneven) and unsettled outputs taken through their blocks in
    several batches give the same registers and events."""
    monkeypatch.setattr(narrow, "NARROW_GEMM", 900)
    monkeypatch.setattr(narrow, "NARROW_CHUNK", 150)
    monkeypatch.setattr(narrow, "NARROW_WALK", 25)
    monkeypatch.setattr(narrow, "NARROW_BLOCK", 16)
    rng = np.random.default_rng(5)
    for signed in (False, True):
        cols, w = _random(rng, 2, 211, 6, 70, signed)
        _check(cols, w)
        _check(cols, w, overflow="wrap")


def test_float64_products_and_int_columns():
    """Products beyond float32's exact integers (float64 arithmetic), and int64 columns (as QGemm passes them)."""
    rng = np.random.default_rng(9)
    cols = rng.integers(-4095, 4096, (1, 40, 60))
    w = rng.integers(-4095, 4096, (1, 5, 60))
    _check(cols.astype(np.float64), w, 16)
    _check(cols, w, 24)
    cols = rng.integers(0, 256, (1, 40, 60))
    _check(cols, rng.integers(-127, 128, (1, 5, 60)), 16)
