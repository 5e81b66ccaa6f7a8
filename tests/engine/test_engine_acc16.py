"""The narrow-accumulator (16 / 12-bit, saturate / wrap) GEMM of the engine is exactly the tap-by-tap register.

``narrow.gemm_acc`` computes it by blocks of taps (``narrow.narrow_acc``); the oracle below is the loop it replaced,
written out plainly: one step per tap over every output, the register fitted after each step, one event per
step whose partial sum left the range, the bias added as one more step. Results must be identical integers.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeslim.engine import narrow
from edgeslim.engine.overflow import OverflowStats
from edgeslim.analysis import run_narrow_threads
from edgeslim.engine.run import run


def tap_by_tap(cols, wk, bias=None, *, accumulator_bits=16, overflow="saturate"):
    """The oracle: (G, M, K) x (G, O, K) accumulated in a ``accumulator_bits`` register, tap by tap."""
    lo, hi = -(1 << (accumulator_bits - 1)), (1 << (accumulator_bits - 1)) - 1
    G, M, K = cols.shape
    O = wk.shape[1]

    def fit(reg):
        if overflow == "saturate":
            return np.clip(reg, lo, hi)
        return (reg - lo) % (1 << accumulator_bits) + lo

    c, w = np.asarray(cols).astype(np.int64), np.asarray(wk).astype(np.int64)
    reg = np.zeros((G, M, O), dtype=np.int64)
    events = np.zeros((G, O), dtype=np.int64)
    steps = [c[:, :, k, None] * w[:, None, :, k] for k in range(K)]
    if bias is not None:
        steps.append(np.broadcast_to(np.asarray(bias, dtype=np.int64).reshape(G, 1, O), (G, M, O)))
    for term in steps:
        reg = reg + term
        events += ((reg < lo) | (reg > hi)).sum(axis=1)
        reg = fit(reg)
    return reg, events


def _operands(rng, G, M, O, K, *, signed, big=False, dtype=np.float32):
    """Codes that overflow a 16-bit register often: mostly positive weights on large activations (ReLU-like
    inputs), or signed inputs (a first layer); ``big``: 12-bit codes, block sums beyond float32's exact range."""
    amax, wmax = (2047, 2047) if big else (255, 127)
    if signed:
        cols = rng.integers(-amax, amax + 1, (G, M, K))
    else:
        cols = rng.integers(0, amax + 1, (G, M, K)) * (rng.random((G, M, K)) < 0.6)  # zeros: padding, ReLU
    w = rng.integers(-wmax // 2, wmax + 1, (G, O, K))
    return cols.astype(dtype), w


SHAPES = [  # G, M, O, K
    (1, 1, 1, 1),
    (1, 37, 5, 1),
    (1, 50, 3, 7),
    (1, 64, 16, 27),     # a first conv (3x3x3): K not a multiple of the block
    (1, 200, 8, 144),    # 3x3x16
    (2, 33, 4, 20),      # grouped
    (3, 40, 1, 9),       # depthwise-like
    (1, 70, 12, 300),
]


pytestmark = pytest.mark.usefixtures("narrow_stages")  # every test with both stages (conftest.py)


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
@pytest.mark.parametrize("bits", [16, 12])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_acc_equals_tap_by_tap(shape, bits, overflow):
    G, M, O, K = shape
    rng = np.random.default_rng([*shape, bits, overflow == "wrap"])
    for signed in (False, True):
        cols, w = _operands(rng, G, M, O, K, signed=signed)
        for bias in (None, rng.integers(-40000, 40000, (G, O))):
            want_acc, want_ev = tap_by_tap(cols, w, bias, accumulator_bits=bits, overflow=overflow)
            acc, ev = narrow.gemm_acc(cols, w, bias, accumulator_bits=bits, overflow=overflow)
            assert acc.dtype == np.int64 and ev.dtype == np.int64
            np.testing.assert_array_equal(acc, want_acc)
            np.testing.assert_array_equal(ev, want_ev)


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_gemm_acc_small_steps_and_threads(monkeypatch, overflow):
    """Many row steps (the last one split unevenly over BLAS calls), several walks per block: same result."""
    monkeypatch.setattr(narrow, "NARROW_GEMM", 700)
    monkeypatch.setattr(narrow, "NARROW_CHUNK", 100)
    monkeypatch.setattr(narrow, "NARROW_WALK", 40)
    rng = np.random.default_rng(11)
    for G, M, O, K, signed in ((1, 301, 6, 64, False), (2, 157, 5, 27, True)):
        cols, w = _operands(rng, G, M, O, K, signed=signed)
        bias = rng.integers(-40000, 40000, (G, O))
        want = tap_by_tap(cols, w, bias, accumulator_bits=16, overflow=overflow)
        got = narrow.gemm_acc(cols, w, bias, accumulator_bits=16, overflow=overflow)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_many_outputs_overflow_in_the_random_cases():
    """The operands above do exercise the slow path: most outputs leave the register, often more than once."""
    rng = np.random.default_rng(1)
    cols, w = _operands(rng, 1, 200, 8, 144, signed=False)
    reg_free, _ = tap_by_tap(cols, w, accumulator_bits=40)
    _, ev = tap_by_tap(cols, w, accumulator_bits=16)
    assert ((reg_free < -32768) | (reg_free > 32767)).mean() > 0.3 and ev.sum() > 200 * 8


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_gemm_acc_int_operands_and_float64_range(overflow):
    """int64 operands (QGemm passes them), and 12-bit codes whose block sums exceed float32's exact integers."""
    rng = np.random.default_rng(7)
    cases = [_operands(rng, 1, 60, 6, 50, signed=True, big=big, dtype=dtype)
             for dtype, big in ((np.int64, False), (np.float64, True), (np.int64, True))]
    cases.append((np.full((1, 4, 40), 2047.0), np.array([[[2047] * 40, [-2047] * 40]])))  # block sums beyond 2**24
    for cols, w in cases:
        for bits in (16, 24):
            want = tap_by_tap(cols, w, None, accumulator_bits=bits, overflow=overflow)
            got = narrow.gemm_acc(cols, w, None, accumulator_bits=bits, overflow=overflow)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_gemm_acc_rows_inside_and_outside_the_register(overflow):
    """Rows whose partial sums all stay in the register next to rows that overflow, in one call: each row
    equals the tap-by-tap register."""
    rng = np.random.default_rng(12)
    for signed in (False, True):
        cols, w = _operands(rng, 2, 90, 7, 75, signed=signed)
        cols[:, ::3] = np.trunc(cols[:, ::3] / 40)           # small rows: no event
        cols[:, 1::7] = 0                                      # empty rows
        bias = rng.integers(-40000, 40000, (2, 7))
        want = tap_by_tap(cols, w, bias, accumulator_bits=16, overflow=overflow)
        got = narrow.gemm_acc(cols, w, bias, accumulator_bits=16, overflow=overflow)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        _, small_events = tap_by_tap(cols[:, ::3], w, None, accumulator_bits=16, overflow=overflow)
        assert small_events.sum() == 0 and want[1].sum() > 100  # both kinds of rows are there


def test_gemm_acc_no_overflow_and_empty():
    rng = np.random.default_rng(3)
    cols, w = rng.integers(0, 4, (1, 30, 10)).astype(np.float32), rng.integers(-3, 4, (1, 5, 10))
    acc, ev = narrow.gemm_acc(cols, w, np.full((1, 5), 7), accumulator_bits=16)
    np.testing.assert_array_equal(acc, cols.astype(np.int64) @ w[0].T + 7)
    assert not ev.any()
    for G, M, O, K in ((1, 0, 4, 9), (1, 5, 0, 9), (1, 5, 4, 0)):
        cols, w = np.zeros((G, M, K), np.float32), np.ones((G, O, K), np.int64)
        bias = np.full((G, O), 40000)
        for overflow in ("saturate", "wrap"):
            got = narrow.gemm_acc(cols, w, bias, accumulator_bits=16, overflow=overflow)
            want = tap_by_tap(cols, w, bias, accumulator_bits=16, overflow=overflow)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError):
        narrow.gemm_acc(np.ones((1, 2, 3), np.float32), np.ones((1, 2, 3)), accumulator_bits=16, overflow="clamp")


def test_product_counts_in_row_chunks(monkeypatch):
    """``count_products_out_of_int8`` (the statistics' Table 1 counts), histograms built over row chunks."""
    from edgeslim.engine import overflow

    monkeypatch.setattr(overflow, "_HIST_CHUNK", 64)
    rng = np.random.default_rng(4)
    cols = rng.integers(-200, 256, (2, 300, 20)).astype(np.float32)
    w = rng.integers(-128, 128, (2, 7, 20))
    prods = cols.astype(np.int64)[:, :, None, :] * w[:, None, :, :]          # (G, M, O, K)
    want = ((prods < -128) | (prods > 127)).sum(axis=(1, 3))
    np.testing.assert_array_equal(overflow.count_products_out_of_int8(cols, w), want)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_graph():
    import torch
    from conftest import make_tiny_resnet

    from edgeslim import api
    from edgeslim.config import PTQConfig

    calib = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    return api.quantize(make_tiny_resnet(), calib, PTQConfig()).intgraph


def test_engine_and_overflow_stats_identical_to_the_tap_by_tap_path(tiny_graph, monkeypatch):
    """``analyze``-style runs (engine outputs, and ``overflow_summary`` with its per-filter counts) with 16 and
    12-bit accumulators give the same numbers with the new GEMM as with the tap-by-tap one; so do runs without
    statistics."""
    from edgeslim.analysis import overflow_summary
    from edgeslim.config import AnalyzeOptions

    g = tiny_graph
    x = 3 * np.random.default_rng(5).standard_normal((12, 3, 16, 16)).astype(np.float32)  # large codes: overflow

    def everything():
        out = {}
        for bits, mode in ((16, "saturate"), (16, "wrap"), (12, "wrap")):
            st = OverflowStats()
            codes = run(g, x, accumulator_bits=bits, overflow=mode, stats=st, batch_size=6, return_codes=True)
            out[bits, mode] = (codes, {r["name"]: st.per_filter(r["name"]) for r in st.layers()})
            # without statistics no event is counted (a wrapping register is then the sum wrapped once)
            out["plain", bits, mode] = run(g, x, accumulator_bits=bits, overflow=mode, batch_size=6, return_codes=True)
        opts = AnalyzeOptions(accumulator_bits=16, overflow_mode="saturate", overflow_images=12)
        out["summary", 16] = overflow_summary(g, (x[i:i + 6] for i in range(0, 12, 6)), opts)
        return out

    new = everything()
    monkeypatch.setattr(narrow, "gemm_acc", tap_by_tap)
    old = everything()
    events = 0
    for key in new:
        if key[0] == "summary":
            assert new[key] == old[key]
            continue
        if key[0] == "plain":
            for name, codes in new[key].items():  # against the tap-by-tap register's codes
                np.testing.assert_array_equal(codes, old[key[1:]][0][name], err_msg=f"{key} {name}")
            continue
        (codes_n, pf_n), (codes_o, pf_o) = new[key], old[key]
        assert codes_n.keys() == codes_o.keys()
        for name in codes_n:
            np.testing.assert_array_equal(codes_n[name], codes_o[name], err_msg=f"{key} {name}")
        for name in pf_n:
            for stat in pf_n[name]:
                np.testing.assert_array_equal(pf_n[name][stat], pf_o[name][stat], err_msg=f"{key} {name} {stat}")
            events += int(pf_n[name]["accumulator_overflows"].sum())
    assert events > 1000  # the registers did overflow


def test_analyze_counts_overflow_in_its_engine_pass_as_a_separate_pass_does(tiny_graph):
    """``analysis.analyze_outputs`` with overflow on the first 7 of 12 inputs in batches of 5 (a batch split at the
    boundary): the engine outputs equal a plain run and the overflow summary equals ``overflow_summary`` run
    separately on those 7 inputs."""
    from edgeslim.analysis import analyze_outputs, overflow_summary
    from edgeslim.config import AnalyzeOptions

    g = tiny_graph
    x = 3 * np.random.default_rng(6).standard_normal((12, 3, 16, 16)).astype(np.float32)
    opts = AnalyzeOptions(accumulator_bits=16, overflow_mode="wrap", overflow_images=7)
    plain = run(g, x, accumulator_bits=16, overflow="wrap")
    names = list(plain)
    outs = {n: plain[n] for n in names}
    res = analyze_outputs(g, x, outs, outs, opts, batch_size=5)
    assert all(r.get("max_abs_diff") == 0.0 for r in res["engine_vs_onnx"].values())  # the engine gave plain's bits
    separate = overflow_summary(g, (x[i:min(i + 5, 7)] for i in range(0, 7, 5)), opts)
    assert res["overflow"] == separate and separate["images"] == 7
    assert sum(r["accumulator_overflows"] for r in separate["layers"]) > 0


@pytest.mark.parametrize("bits,mode", [(16, "saturate"), (12, "wrap"), (32, "saturate")])
def test_narrow_threads_give_runs_outputs_and_overflow_counts(tiny_graph, bits, mode):
    """``run_narrow_threads`` on 3 uneven slices of 13 inputs: the same outputs as one ``run`` over all of them, and
    the same overflow statistics (per layer and per filter) merged from the slices."""
    x = 3 * np.random.default_rng(7).standard_normal((13, 3, 16, 16)).astype(np.float32)
    one, split = OverflowStats(), OverflowStats()
    a = run(tiny_graph, x, accumulator_bits=bits, overflow=mode, stats=one, batch_size=4)
    b = run_narrow_threads(tiny_graph, x, accumulator_bits=bits, overflow=mode, stats=split, batch_size=4, workers=3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert one.layers() == split.layers() and one.layers()
    for r in one.layers():
        for stat, v in one.per_filter(r["name"]).items():
            np.testing.assert_array_equal(v, split.per_filter(r["name"])[stat])
    assert bits == 32 or sum(r["accumulator_overflows"] for r in one.layers()) > 0
