"""The numpy integer engine against independent oracles (onnxruntime single-op models, brute force)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim.engine import ops
from edgeslim.engine.overflow import OverflowStats, count_products_out_of_int8
from edgeslim.engine.run import run
from edgeslim.export.onnx_qdq import host_weight_type, weight_container as host_safe_weights

ENGINE = Path(__file__).resolve().parents[2] / "edgeslim" / "engine"


U8, F32 = TensorProto.UINT8, TensorProto.FLOAT


def _ort_run(nodes, inputs: dict, outputs: list[str], inits: dict | None = None, level=None, types=None):
    """One tiny onnxruntime model: ``inputs`` fed, ``inits`` constant, ``outputs`` fetched (uint8 unless
    ``types`` says otherwise)."""
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(o, (types or {}).get(o, U8), None) for o in outputs]
    graph = helper.make_graph(nodes, "t", ins, outs,
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if level is not None:
        opts.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, inputs)


def _f32(v):
    return np.array(v, dtype=np.float32)


# ----------------------------------------------------------------------------- single ops vs onnxruntime

CONV_CASES = [  # (C, O, k, stride, pad, dilation, group)
    (3, 8, 3, 1, 1, 1, 1),
    (8, 16, 3, 2, 1, 1, 1),
    (8, 8, 3, 1, 1, 1, 8),      # depthwise
    (8, 12, 3, 1, 2, 2, 4),     # grouped + dilated
    (6, 5, 1, 1, 0, 1, 1),      # pointwise
    (4, 6, (3, 1), 2, 0, 1, 2), # non-square kernel, no padding
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_qlinearconv_matches_onnxruntime(case):
    C, O, k, s, p, d, grp = case
    kh, kw = k if isinstance(k, tuple) else (k, k)
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.integers(0, 256, (3, C, 11, 10)).astype(np.uint8)
    w = rng.integers(-127, 128, (O, C // grp, kh, kw)).astype(np.int8)
    bias = rng.integers(-5000, 5000, O).astype(np.int32)
    xs, xz, ys, yz = 0.02, 117, 0.05, 99
    ws = rng.uniform(0.001, 0.01, O).astype(np.float32)
    pads = [p, p, p, p]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            strides=[s, s], pads=pads, dilations=[d, d], group=grp, kernel_shape=[kh, kw])
    w_ort, wz_ort = host_safe_weights(w, np.zeros(O, np.int8))
    (ref,) = _ort_run([node], {"x": x}, ["y"], {"xs": _f32(xs), "xz": np.uint8(xz), "w": w_ort, "ws": ws,
                                                 "wz": wz_ort, "ys": _f32(ys), "yz": np.uint8(yz),
                                                 "b": bias})
    y, _ = ops.QLinearConv(x, xz, w, np.zeros(O), bias, multiplier=ops.ort_multiplier(xs, ws, ys),
                           y_zero_point=yz, clamp=(0, 255), strides=(s, s), pads=pads, dilations=(d, d), group=grp)
    np.testing.assert_array_equal(y, ref)


def test_conv_accumulator_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (2, 4, 6, 6))
    w = rng.integers(-128, 128, (6, 2, 3, 3))
    zw = rng.integers(-3, 4, 6)
    acc, _ = ops.conv_acc(x, 5, w, zw, None, strides=(1, 1), pads=(1, 1, 1, 1), group=2)
    xp = np.pad(x - 5, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros_like(acc)
    for o in range(6):
        g = o // 3
        for i in range(6):
            for j in range(6):
                ref[:, o, i, j] = ((xp[:, 2 * g:2 * g + 2, i:i + 3, j:j + 3]) * (w[o] - zw[o])).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(acc, ref)
    # the im2col path (taken with an observer or a narrow accumulator) computes the same sums
    cols_acc, _ = ops.conv_acc(x, 5, w, zw, None, strides=(1, 1), pads=(1, 1, 1, 1), group=2,
                               observer=lambda *args: None)
    np.testing.assert_array_equal(cols_acc, ref)
    wide, ev = ops.conv_acc(x, 5, w, zw, None, strides=(1, 1), pads=(1, 1, 1, 1), group=2, accumulator_bits=28)
    np.testing.assert_array_equal(wide, ref)
    assert ev.sum() == 0


def _conv_int64(x, zx, w, bias):
    """Brute force in int64 (no padding, stride 1): numpy's integer einsum, exact below 2**63."""
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64) - zx, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.int64)) + bias.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("target, ftype, lower", [((1 << 24) - 101, np.float32, None),
                                                   (1 << 25, np.float64, np.float32),
                                                   (1 << 54, np.int64, np.float64)],
                         ids=["float32-edge", "float64", "int64"])
def test_conv_and_gemm_exact_at_the_float_bounds(target, ftype, lower):
    """The BLAS GEMMs run in float32 / float64 only where every partial sum is an exactly representable integer
    (below 2**24 / 2**53, ``narrow.gemm_type`` of ``max|x - zx| * max sum|w| + max|bias|``); codes whose sums
    come near that bound equal an int64 brute force, and the next narrower float type would not (the sums do
    need the wider type)."""
    from edgeslim.engine import narrow

    rng = np.random.default_rng(target % 997)
    C, O, k, zx = 3, 4, 3, 5
    dmax = (1 << 20) if ftype is np.int64 else 127
    wmax = target // (dmax * C * k * k)
    w = rng.integers(-wmax, wmax + 1, (O, C, k, k))
    w[0] = rng.integers(wmax - 3, wmax + 1, (C, k, k))            # filter 0: near the largest sums
    x = rng.integers(-dmax, dmax + 1, (2, C, 5, 5)) + zx
    x[0] = zx + rng.integers(dmax - 3, dmax + 1, (C, 5, 5))      # image 0: near the largest codes
    x[0, 0, 0, 0] = zx + dmax
    bias = rng.integers(-100, 101, O)
    bound = dmax * int(np.abs(w).reshape(O, -1).sum(axis=1).max()) + int(np.abs(bias).max())
    assert narrow.gemm_type(bound) is ftype and bound > 0.99 * target
    ref = _conv_int64(x, zx, w, bias)
    assert (ref - bias.reshape(1, -1, 1, 1)).max() > 0.9 * bound
    for observer in (None, lambda *args: None):                    # the GEMM of conv_acc / of narrow.gemm_acc
        acc, ev = ops.conv_acc(x, zx, w, 0, bias, observer=observer, accumulator_bits=64)
        np.testing.assert_array_equal(acc, ref)
        assert acc.dtype == np.int64 and not ev.any()
    xg, wg = x[:, :, :k, :k].reshape(2, -1), w.reshape(O, -1)     # QGemm: one receptive field per row
    acc, _ = ops.gemm_int(xg, zx, wg, 0, bias, accumulator_bits=64)
    np.testing.assert_array_equal(acc, ref[:, :, 0, 0])
    if lower is not None:
        win = np.lib.stride_tricks.sliding_window_view(x - zx, (k, k), axis=(2, 3)).transpose(0, 2, 3, 1, 4, 5)
        narrower = win.reshape(-1, C * k * k).astype(lower) @ wg.T.astype(lower)
        exact = (ref - bias.reshape(1, -1, 1, 1)).transpose(0, 2, 3, 1).reshape(-1, O)
        assert not np.array_equal(narrower.astype(np.int64), exact)


def _ort_qlinearadd(a, b, sa, za, sb, zb, sy, zy):
    node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], domain="com.microsoft")
    (ref,) = _ort_run([node], {"a": a, "b": b}, ["y"], {"sa": _f32(sa), "za": np.uint8(za), "sb": _f32(sb),
                                                        "zb": np.uint8(zb), "sy": _f32(sy), "zy": np.uint8(zy)})
    return ref.astype(np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_qlinearadd_matches_onnxruntime_on_every_input_pair(seed):
    rng = np.random.default_rng(seed)
    sa, sb, sy = (0.03, 0.02, 0.04) if seed == 0 else rng.uniform(0.002, 0.06, 3)  # seed 0: exact ties
    za, zb, zy = (10, 200, 128) if seed == 0 else (int(v) for v in rng.integers(0, 256, 3))
    A, B = np.meshgrid(np.arange(256), np.arange(256))
    a, b = A.astype(np.uint8)[None, None], B.astype(np.uint8)[None, None]
    ref = _ort_qlinearadd(a, b, sa, za, sb, zb, sy, zy)
    np.testing.assert_array_equal(ops.QLinearAdd(a, sa, za, b, sb, zb, sy, zy, (0, 255)), ref)


def test_qlinearadd_signed_codes_use_the_uint8_container():
    rng = np.random.default_rng(1)
    a, b = rng.integers(-128, 128, (2, 3, 20, 20)), rng.integers(0, 256, (2, 3, 20, 20))
    sa, za, sb, zb, sy, zy = 0.031, -3, 0.017, 40, 0.029, 5   # a and y signed (stored + 128), b unsigned
    ref = _ort_qlinearadd((a + 128).astype(np.uint8), b.astype(np.uint8), sa, za + 128, sb, zb, sy, zy + 128)
    y = ops.QLinearAdd(a, sa, za, b, sb, zb, sy, zy, (-128, 127), offsets=(128, 0, 128))
    np.testing.assert_array_equal(y + 128, ref)


def test_qlinear_global_average_pool_matches_onnxruntime():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (3, 6, 8, 5)).astype(np.uint8)
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                            channels_last=0)
    (ref,) = _ort_run([node], {"x": x}, ["y"], {"xs": _f32(0.037), "xz": np.uint8(21), "ys": _f32(0.013),
                                                 "yz": np.uint8(3)})
    np.testing.assert_array_equal(ops.QLinearGlobalAveragePool(x, 0.037, 21, 0.013, 3, (0, 255)), ref)


@pytest.mark.parametrize("float_output", [True, False])
def test_qgemm_matches_onnxruntime(float_output):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (7, 40)).astype(np.uint8)
    w = rng.integers(-127, 128, (5, 40)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, 5).astype(np.float32)
    bias = rng.integers(-3000, 3000, 5).astype(np.int32)
    ins = ["x", "xs", "xz", "w", "ws", "wz", "b"] + ([] if float_output else ["ys", "yz"])
    node = helper.make_node("QGemm", ins, ["y"], domain="com.microsoft", transB=1)
    w_ort, wz_ort = host_safe_weights(w, np.zeros(5, np.int8))
    inits = {"xs": _f32(0.02), "xz": np.uint8(77), "w": w_ort, "ws": ws, "wz": wz_ort, "b": bias,
             "ys": _f32(0.3), "yz": np.uint8(100)}
    (ref,) = _ort_run([node], {"x": x}, ["y"], inits, types={"y": F32 if float_output else U8})
    y, _ = ops.QGemm(x, 77, w, np.zeros(5), bias, x_scale=0.02, w_scale=ws, float_output=float_output,
                     multiplier=ops.ort_multiplier(0.02, ws, 0.3), y_zero_point=100, clamp=(0, 255))
    np.testing.assert_array_equal(y, ref)  # float output too: float32(acc) * float32(x_scale * w_scale)


def test_qlinearconcat_matches_onnxruntime():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    b = rng.integers(0, 256, (2, 5, 4, 4)).astype(np.uint8)
    node = helper.make_node("QLinearConcat", ["ys", "yz", "a", "sa", "za", "b", "sb", "zb"], ["y"],
                            domain="com.microsoft", axis=1)
    (ref,) = _ort_run([node], {"a": a, "b": b}, ["y"], {"ys": _f32(0.05), "yz": np.uint8(128), "sa": _f32(0.05),
                                                        "za": np.uint8(128), "sb": _f32(0.031), "zb": np.uint8(17)})
    y = ops.QLinearConcat([a, b], [(0.05, 128), (0.031, 17)], 0.05, 128, (0, 255), axis=1)
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("k", [2, 3])
def test_qlinear_average_pool_matches_onnxruntime(k):
    rng = np.random.default_rng(5 + k)
    x = rng.integers(0, 256, (4, 6, 12, 12)).astype(np.uint8)
    node = helper.make_node("QLinearAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft",
                            kernel_shape=[k, k], strides=[k, k])
    (ref,) = _ort_run([node], {"x": x}, ["y"], {"xs": _f32(0.037), "xz": np.uint8(21), "ys": _f32(0.029),
                                                 "yz": np.uint8(3)})
    # exact on the data measured; onnxruntime sums dequantized floats, so exactness is not guaranteed
    np.testing.assert_array_equal(ops.QLinearAveragePool(x, 0.037, 21, 0.029, 3, (0, 255), [k, k], [k, k]), ref)


def test_qlinear_relu_matches_onnxruntime_qdq():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (3, 4, 5, 5)).astype(np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["f"]), helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["y"])]
    (ref,) = _ort_run(nodes, {"x": x}, ["y"], {"xs": _f32(0.03), "xz": np.uint8(130), "ys": _f32(0.017),
                                               "yz": np.uint8(0)}, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(ops.QLinearRelu(x, 0.03, 130, 0.017, 0, (0, 255)), ref)


def test_quantize_dequantize_match_onnxruntime():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 3, 4, 4)) * 3).astype(np.float32)
    x.flat[:4] = [0.5 * 0.05, 1.5 * 0.05, -2.5 * 0.05, 1000.0]  # ties and saturation
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"])]
    q, d = _ort_run(nodes, {"x": x}, ["q", "d"], {"s": _f32(0.05), "z": np.uint8(120)}, types={"d": F32},
                    level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(ops.QuantizeLinear(x, 0.05, 120, 0, 255), q)
    np.testing.assert_array_equal(ops.DequantizeLinear(q, 0.05, 120), d)


def test_data_movement_matches_onnxruntime():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (2, 4, 7, 6)).astype(np.uint8)
    nodes = [helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0]),
             helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["sl"]),
             helper.make_node("Pad", ["x", "pads", "pv"], ["pd"], mode="constant"),
             helper.make_node("Flatten", ["x"], ["fl"], axis=1)]
    inits = {"st": np.array([0, 1], np.int64), "en": np.array([7, 6], np.int64), "ax": np.array([2, 3], np.int64),
             "sp": np.array([2, 2], np.int64), "pads": np.array([0, 2, 0, 1, 0, 2, 1, 0], np.int64),
             "pv": np.uint8(9)}
    mp, sl, pd, fl = _ort_run(nodes, {"x": x}, ["mp", "sl", "pd", "fl"], inits)
    np.testing.assert_array_equal(ops.MaxPool(x, [3, 2], [2, 2], [1, 0, 1, 0]), mp)
    np.testing.assert_array_equal(ops.Slice(x, [0, 1], [7, 6], [2, 3], [2, 2]), sl)
    np.testing.assert_array_equal(ops.Pad(x, [0, 2, 0, 1, 0, 2, 1, 0], 9), pd)
    np.testing.assert_array_equal(ops.Flatten(x, 1), fl)
    np.testing.assert_array_equal(ops.Identity(x), x)


# ----------------------------------------------------------------------------- requantization modes

def test_requantize_modes():
    rng = np.random.default_rng(9)
    acc = rng.integers(-2**20, 2**20, (1000, 4))
    acc[:4, 0] = [8, 24, -8, -24]  # exact ties for the 2**-4 multiplier
    shifts = np.array([34, 36, 31, 40])
    m0 = np.full(4, 1 << 30)
    mult = m0 / 2.0 ** shifts
    fixed = ops.requantize(acc, mult, m0, shifts, 0, -2**20, 2**20, "fixed")
    shift = ops.requantize(acc, mult, m0, shifts, 0, -2**20, 2**20, "shift")
    np.testing.assert_array_equal(fixed, shift)
    np.testing.assert_array_equal(fixed, np.floor(acc * mult + 0.5).astype(np.int64))  # round half up
    np.testing.assert_array_equal(fixed[:4, 0], [1, 2, 0, -1])
    floaty = ops.requantize(acc, mult, m0, shifts, 0, -2**20, 2**20, "float")
    np.testing.assert_array_equal(floaty[:4, 0], [0, 2, 0, -2])  # half to even
    # non power of two: fixed point agrees with the real multiplier to within one code
    m = rng.uniform(1e-4, 0.9, 4)
    m0s, sh = zip(*[_qm(float(v)) for v in m])
    f = ops.requantize(acc, m, np.array(m0s), np.array(sh), 0, -2**30, 2**30, "fixed")
    r = ops.requantize(acc, m, np.array(m0s), np.array(sh), 0, -2**30, 2**30, "float")
    assert np.abs(f - r).max() <= 1
    with pytest.raises(ValueError):
        ops.requantize(acc, m, np.array(m0s), np.array(sh), 0, 0, 1, "shift")


def _qm(real: float) -> tuple[int, int]:
    mant, exp = np.frexp(real)
    m0 = round(float(mant) * 2**31)
    if m0 == 2**31:
        m0, exp = m0 // 2, exp + 1
    return m0, 31 - int(exp)


# ----------------------------------------------------------------------------- overflow analysis

def test_overflow_stats_match_brute_force():
    rng = np.random.default_rng(10)
    x = rng.integers(0, 256, (2, 3, 5, 5))
    w = rng.integers(-128, 128, (4, 3, 3, 3))
    w[0, 0, 0, 0], w[1] = 0, 1  # a zero tap, and a filter of ones (out of int8 only where x - zx > 127)
    zx = 120
    st = OverflowStats()
    ops.conv_acc(x, zx, w, np.zeros(4), None, pads=(1, 1, 1, 1), observer=st.observer("c", 4))
    xp = np.pad(x - zx, ((0, 0), (0, 0), (1, 1), (1, 1)))
    prods = np.stack([xp[:, None, :, i:i + 3, j:j + 3] * w[None] for i in range(5) for j in range(5)])  # (P,N,O,C,3,3)
    prods = prods.transpose(2, 0, 1, 3, 4, 5).reshape(4, -1)
    frac = ((prods < -128) | (prods > 127)).mean(axis=1)
    sums = prods.reshape(4, 25, 2, -1).sum(-1).reshape(4, -1)
    pf = st.per_filter("c")
    np.testing.assert_allclose(pf["product_int8"], frac)
    np.testing.assert_allclose(pf["sum_int16"], ((sums < -32768) | (sums > 32767)).mean(axis=1))
    row = st.layers()[0]
    assert row["name"] == "c" and row["product_int8"]["max"] == pytest.approx(frac.max())


@pytest.mark.parametrize("mode", ["saturate", "wrap"])
def test_16bit_overflow_events_match_a_sequential_register(mode):
    rng = np.random.default_rng(13)
    x = rng.integers(0, 256, (2, 3, 4, 4))
    w = rng.integers(-128, 128, (3, 3, 3, 3))
    bias = np.array([30000, -30000, 5])
    st = OverflowStats()
    acc, ev = ops.conv_acc(x, 100, w, np.zeros(3), bias, pads=(1, 1, 1, 1), accumulator_bits=16, overflow=mode,
                           observer=st.observer("c", 3))
    xp = np.pad(x - 100, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want_acc, want_ev = np.zeros_like(acc), np.zeros(3, dtype=np.int64)
    for n in range(2):
        for o in range(3):
            for i in range(4):
                for j in range(4):
                    reg = 0
                    terms = [int(xp[n, c, i + a, j + b_]) * int(w[o, c, a, b_])
                             for a in range(3) for b_ in range(3) for c in range(3)]  # (kh, kw, channel) order
                    for t in terms + [int(bias[o])]:
                        reg += t
                        if not -32768 <= reg <= 32767:
                            want_ev[o] += 1
                            reg = min(max(reg, -32768), 32767) if mode == "saturate" else (reg + 32768) % 65536 - 32768
                    want_acc[n, o, i, j] = reg
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(ev, want_ev)
    np.testing.assert_array_equal(st.per_filter("c")["accumulator_overflows"], want_ev)


def test_product_count_boundaries():
    d = np.arange(-300, 301)[None, :, None]            # every input value once, one tap
    w = np.array([[[v]] for v in (1, 2, 3, 5, 64, 127, 128, -1, -2, -3, -128, -127, 0)]).reshape(1, -1, 1)
    got = count_products_out_of_int8(d, w)[0]
    want = [int(((d[0, :, 0] * v < -128) | (d[0, :, 0] * v > 127)).sum()) for v in w[0, :, 0]]
    np.testing.assert_array_equal(got, want)


def test_16bit_accumulator_saturate_and_wrap():
    x = np.full((1, 8, 3, 3), 255)
    w = np.full((2, 8, 3, 3), 127)
    w[1] = -127
    kwargs = {"strides": (1, 1), "pads": (0, 0, 0, 0)}
    exact, ev32 = ops.conv_acc(x, 0, w, np.zeros(2), None, **kwargs)
    sat, ev_s = ops.conv_acc(x, 0, w, np.zeros(2), None, accumulator_bits=16, overflow="saturate", **kwargs)
    wrap, ev_w = ops.conv_acc(x, 0, w, np.zeros(2), None, accumulator_bits=16, overflow="wrap", **kwargs)
    total = 72 * 255 * 127
    assert exact.ravel().tolist() == [total, -total] and ev32.sum() == 0
    assert sat.ravel().tolist() == [32767, -32768]
    assert wrap.ravel().tolist() == [((total + 32768) % 65536) - 32768, ((-total + 32768) % 65536) - 32768]
    step = 255 * 127  # 32385: the register overflows from the 2nd tap on when saturating (every tap after)
    assert ev_s.tolist() == [71, 71]
    assert ev_w[0] == sum(1 for k in range(1, 72) if ((k * step + 32768) % 65536) - 32768 + step > 32767)
    # a non-overflowing input is identical at 16 and 32 bits
    small, _ = ops.conv_acc(x // 64, 0, w // 64, np.zeros(2), None, accumulator_bits=16, **kwargs)
    np.testing.assert_array_equal(small, ops.conv_acc(x // 64, 0, w // 64, np.zeros(2), None, **kwargs)[0])


# ----------------------------------------------------------------------------- end to end vs onnxruntime

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import torch
    from conftest import make_tiny_resnet

    from edgeslim import api
    from edgeslim.config import PTQConfig

    calib = torch.from_numpy(np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    out = {}
    configs = {"float": PTQConfig(), "pow2": PTQConfig(scale="pow2"), "signed": PTQConfig(scheme="symmetric"),
               "unfused": PTQConfig(fuse=False, granularity="tensor"), "6bit": PTQConfig(a_bits=6, w_bits=6)}
    for name, cfg in configs.items():
        q = api.quantize(make_tiny_resnet(), calib, cfg)
        out[name] = (q.intgraph, api.export_onnx(q, tmp_path_factory.mktemp(name) / "m.onnx"))
    return out


@pytest.mark.parametrize("name", ["float", "pow2", "signed", "unfused", "6bit"])
def test_end_to_end_bit_exact_with_onnxruntime(tiny_models, name):
    from edgeslim.eval import ort as ort_eval

    g, path = tiny_models[name]
    x = np.random.default_rng(11).standard_normal((40, 3, 16, 16)).astype(np.float32)
    everything = run(g, x, return_codes=True, batch_size=16)
    ref = ort_eval.predict(ort_eval.session(path), x)
    y = everything[g.output_names[0]]
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
    assert (y.argmax(1) == ref.argmax(1)).all()
    # every intermediate code equals onnxruntime's (fetched as extra graph outputs, uint8 containers)
    model = onnx.load(str(path))
    names = list(g.qparams)
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in names)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n, codes in zip(names, sess.run(names, {sess.get_inputs()[0].name: x})):
        offset = 128 if g.qparams[n].signed and g.qparams[n].bits <= 8 else 0
        np.testing.assert_array_equal(everything[n] + offset, codes, err_msg=n)


def test_requant_modes_and_stats_on_tiny_model(tiny_models):
    g, _ = tiny_models["pow2"]
    x = np.random.default_rng(12).standard_normal((8, 3, 16, 16)).astype(np.float32)
    fixed = run(g, x, requant="fixed", return_codes=True)
    shift = run(g, x, requant="shift", return_codes=True)
    for k in fixed:
        np.testing.assert_array_equal(fixed[k], shift[k], err_msg=k)
    gf, _ = tiny_models["float"]
    with pytest.raises(ValueError):
        run(gf, x, requant="shift")
    agree = (run(gf, x, requant="fixed")[gf.output_names[0]].argmax(1) == run(gf, x)[gf.output_names[0]].argmax(1))
    assert agree.mean() >= 0.75
    st = OverflowStats()
    run(gf, x, stats=st, accumulator_bits=16, overflow="wrap")
    rows = st.layers()
    assert [r["name"] for r in rows] == [n.name for n in gf.layers()]
    for r in rows:
        assert 0.0 <= r["product_int8"]["min"] <= r["product_int8"]["avg"] <= r["product_int8"]["max"] <= 1.0
        assert r["accumulator_bits"] == 16 and r["accumulator_overflows"] >= 0
    assert st.per_filter(rows[0]["name"])["product_int8"].shape == (gf.layers()[0].arrays["w"].shape[0],)


# ----------------------------------------------------------------------------- numpy only

def test_engine_never_imports_torch():
    for src in ENGINE.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            else:
                continue
            for m in mods:  # numpy, the stdlib's __future__ and math, sibling engine modules and intgraph only;
                # float islands run in ONNX's numpy reference implementation (onnx.reference), never torch
                # numba (optional) compiles the narrow accumulator's loop (narrow_jit), threading guards that once
                ok = m in ("numpy", "__future__", "math", "threading", "numba", "..intgraph", "edgeslim.intgraph",
                           "onnx.reference") or (
                    m.startswith(".") and not m.startswith(".."))
                assert ok, f"{src.name} imports {m}"
    code = (
        "import importlib.abc, importlib.util, sys, types\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'): raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"root = {str(ENGINE.parent)!r}\n"
        "pkg = types.ModuleType('edgeslim'); pkg.__path__ = [root]; sys.modules['edgeslim'] = pkg\n"
        "import edgeslim.engine.run, edgeslim.engine.ops, edgeslim.engine.overflow, edgeslim.engine.float_ops\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_fixed_point_add_with_far_apart_scales():
    """Regression: a large a_scale / y_scale ratio overflowed int64 in the fixed-point rescale."""
    a = np.arange(256)
    b = np.arange(256)[::-1]
    for sa, sb, sy in [(2.0, 1e-4, 0.004), (1e-5, 0.9, 0.002), (0.05, 0.05, 0.1)]:
        y = ops.QLinearAdd(a, sa, 3, b, sb, 7, sy, 2, (0, 255), requant="fixed")
        ref = np.clip(np.floor((a - 3) * (sa / sy) + (b - 7) * (sb / sy) + 0.5) + 2, 0, 255)
        np.testing.assert_array_equal(y, ref)


# ----------------------------------------------------------------------------- QLinearConvTranspose / Resize

CONVT_CASES = [  # (C, O, k, stride, pad, output_padding, dilation, group)
    (4, 6, 3, 2, 1, 1, 1, 1),
    (6, 6, 3, 2, 1, 1, 1, 6),       # depthwise
    (4, 6, 3, 1, 0, 0, 1, 2),       # grouped, no padding
    (3, 5, (3, 2), 2, 1, 0, 2, 1),  # non-square kernel, dilated
    (5, 4, 2, 2, 0, 0, 1, 1),       # the usual 2x upsampling
]


@pytest.mark.parametrize("case", CONVT_CASES, ids=[str(c) for c in CONVT_CASES])
def test_qlinear_conv_transpose_accumulator_matches_onnxruntime(case):
    C, O, k, s, p, op, d, g = case
    kh, kw = (k, k) if isinstance(k, int) else k
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.integers(0, 256, (2, C, 5, 6))
    zx = 131
    w = rng.integers(-127, 128, (C, O // g, kh, kw))
    zw = rng.integers(-3, 4, O)  # per output channel
    bias = rng.integers(-5000, 5000, O)
    # float oracle on the zero-point-corrected operands (every partial sum < 2**24: float32 is exact)
    wf = (w - zw.reshape(g, 1, O // g, 1, 1).repeat(C // g, axis=1).reshape(C, O // g, 1, 1)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[s, s], pads=[p, p, p, p],
                            output_padding=[op, op], dilations=[d, d], group=g)
    (ref,) = _ort_run([node], {"x": (x - zx).astype(np.float32)}, ["y"],
                      inits={"w": wf, "b": bias.astype(np.float32)}, types={"y": F32})
    acc, events = ops.conv_transpose_acc(x, zx, w, zw, bias, strides=(s, s), pads=(p, p, p, p), dilations=(d, d),
                                         group=g, output_padding=(op, op))
    assert acc.shape == ref.shape
    assert np.array_equal(acc, ref.astype(np.int64))
    assert not events.any()
    mult = rng.uniform(1e-4, 4e-4, O).astype(np.float32)
    y, _ = ops.QLinearConvTranspose(x, zx, w, zw, bias, multiplier=mult, y_zero_point=7, clamp=(0, 255),
                                    strides=(s, s), pads=(p, p, p, p), dilations=(d, d), group=g,
                                    output_padding=(op, op))
    expect = np.clip(np.rint(ref * mult.reshape(1, -1, 1, 1)) + 7, 0, 255).astype(np.int64)
    assert np.array_equal(y, expect)
    assert 0 < np.mean((y > 0) & (y < 255))  # not all saturated


RESIZE_SHAPES = [  # (scales, sizes)
    ([1.0, 1.0, 2.0, 3.0], None),
    ([1.0, 1.0, 4.0, 1.0], None),
    (None, [2, 3, 8, 4]),   # up along H, down along W
    (None, [2, 3, 10, 21]),
    (None, [2, 3, 3, 7]),
]


@pytest.mark.parametrize("coord", ["asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners"])
@pytest.mark.parametrize("nearest", ["floor", "round_prefer_floor", "ceil"])
def test_resize_nearest_matches_onnxruntime(coord, nearest):
    x = np.random.default_rng(3).integers(0, 256, (2, 3, 5, 7)).astype(np.uint8)
    for scales, sizes in RESIZE_SHAPES:
        if scales is not None:
            ins, inits = ["x", "", "scales"], {"scales": np.array(scales, np.float32)}
        else:
            ins, inits = ["x", "", "", "sizes"], {"sizes": np.array(sizes, np.int64)}
        node = helper.make_node("Resize", ins, ["y"], mode="nearest", coordinate_transformation_mode=coord,
                                nearest_mode=nearest)
        (ref,) = _ort_run([node], {"x": x}, ["y"], inits=inits)
        got = ops.Resize(x.astype(np.int64), scales=scales, sizes=sizes, coordinate_transformation_mode=coord,
                         nearest_mode=nearest)
        assert got.shape == ref.shape, (scales, sizes)
        assert np.array_equal(got, ref.astype(np.int64)), (scales, sizes)


@pytest.mark.skipif(host_weight_type() != "uint8", reason="only x86 CPUs with AVX2 and no VNNI saturate")
def test_int8_weights_saturate_in_onnxruntime_on_avx2_without_vnni():
    """Why ``export`` stores uint8 weights here: u8 x s8 pairs summed in int16 (vpmaddubsw) saturate."""
    x = np.full((1, 64), 255, np.uint8)
    w = np.full((3, 64), 127, np.int8)
    node = helper.make_node("QGemm", ["x", "xs", "xz", "w", "ws", "wz"], ["y"], domain="com.microsoft", transB=1)
    common = {"xs": _f32(1.0), "xz": np.uint8(0), "ws": np.ones(3, np.float32)}
    (s8,) = _ort_run([node], {"x": x}, ["y"], {**common, "w": w, "wz": np.zeros(3, np.int8)}, types={"y": F32})
    w_u8, wz_u8 = host_safe_weights(w, np.zeros(3, np.int8))
    (u8,) = _ort_run([node], {"x": x}, ["y"], {**common, "w": w_u8, "wz": wz_u8}, types={"y": F32})
    exact, _ = ops.QGemm(x, 0, w, np.zeros(3), None, x_scale=1.0, w_scale=np.ones(3, np.float32), float_output=True)
    assert exact[0, 0] == 64 * 255 * 127
    np.testing.assert_array_equal(u8, exact)
    assert (s8 < exact).all()  # each pair clipped at 32767 instead of 64770
