"""QDQ ONNX -> IntGraph importer (edgeslim.io.onnx_qdq_import)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeslim import api
from edgeslim.api import PTQConfig
from edgeslim.engine.run import run
from edgeslim.errors import EdgeslimError
from edgeslim.export.onnx_qdq import host_weight_type, weight_container as host_safe_weights
from edgeslim.io.onnx_qdq_import import import_qdq


def _x(n: int = 16) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("config", [PTQConfig(), PTQConfig(scale="pow2", scheme="symmetric"), PTQConfig(fuse=False)],
                         ids=["default", "pow2-sym", "nofuse"])
def test_round_trip_edgeslim_export_is_bit_exact(tiny_model, tiny_calib, tmp_path, config):
    q = api.quantize(tiny_model, tiny_calib, config)
    path = api.export_onnx(q, tmp_path / "int8.onnx")
    g = import_qdq(path)
    assert g.input_shape == q.intgraph.input_shape
    assert g.output_names == ["output"] and len(q.intgraph.output_names) == 1  # the FP32 file's interface
    assert g.output_shapes == q.intgraph.output_shapes
    assert [n.op for n in g.nodes if "w" in n.arrays] == [n.op for n in q.intgraph.layers()]
    x = _x()
    ref, got = run(q.intgraph, x), run(g, x)
    for ours, theirs in zip(q.intgraph.output_names, g.output_names):
        assert np.array_equal(ref[ours], got[theirs]), ours
    fixed_ref, fixed_got = run(q.intgraph, x, requant="fixed"), run(g, x, requant="fixed")
    for ours, theirs in zip(q.intgraph.output_names, g.output_names):
        assert np.array_equal(fixed_ref[ours], fixed_got[theirs]), ours


def test_onnxruntime_quantize_static_model_matches_onnxruntime(tiny_model, tiny_calib, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime.quantization")
    from bench.peers import ort_quantize_static

    fp32 = api.export_fp32_onnx(tiny_model, (3, 16, 16), tmp_path / "fp32.onnx")
    # int8 weights saturate in onnxruntime's AVX2 (no VNNI) kernels: use the container that is exact here
    res = ort_quantize_static(fp32, tiny_calib.numpy(), tmp_path / "ort_int8.onnx", activation_type="uint8",
                              per_channel=True, weight_type=host_weight_type())
    assert res.error is None, res.error
    g = import_qdq(res.path)
    assert g.nodes[0].op == "QuantizeLinear" and g.nodes[-1].op == "DequantizeLinear"
    assert {"QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool", "MaxPool", "Slice", "Pad"} <= \
        {n.op for n in g.nodes}
    x = _x(32)
    (out_name,) = g.output_names
    got = run(g, x)[out_name]
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    lsb = g.qparams[g.nodes[-1].inputs[0]].scale
    equal = float(np.mean(got == ref))
    print(f"onnxruntime quantize_static (u8, per-channel): {equal:.4f} of logits equal, "
          f"max diff {np.abs(got - ref).max() / lsb:.2f} LSB")
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= lsb * 1.0001


def _qdq_model(body: list[onnx.NodeProto], inits: list[onnx.TensorProto], out_shape) -> onnx.ModelProto:
    inits = inits + [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                     numpy_helper.from_array(np.array(128, np.uint8), "z"),
                     numpy_helper.from_array(np.array(0.04, np.float32), "so"),
                     numpy_helper.from_array(np.array(0, np.uint8), "zo")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"), *body,
             helper.make_node("QuantizeLinear", ["f", "so", "zo"], ["yq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["y"], name="dq_out")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_float_bias_relu_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 6)).astype(np.int8)  # MatMul: (K, O), per output channel along axis 1
    w, wz = host_safe_weights(w, np.zeros(6, np.int8))
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.uniform(0.002, 0.01, 6).astype(np.float32), "ws"),
             numpy_helper.from_array(wz, "wz"),
             numpy_helper.from_array(rng.normal(0, 0.3, 6).astype(np.float32), "b")]
    body = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
            helper.make_node("MatMul", ["xd", "wd"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["ab"]),
            helper.make_node("Relu", ["ab"], ["f"])]
    model = _qdq_model(body, inits, [6])
    g = import_qdq(model)
    assert [n.op for n in g.nodes] == ["QuantizeLinear", "QGemm", "DequantizeLinear"]
    assert g.nodes[1].attrs["clamp"] == (0, 255) and g.output_shapes == [(6,)]
    x = rng.normal(0, 2, (64, 8)).astype(np.float32)
    got = run(g, x)["y"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    assert (got >= 0).all()
    assert np.abs(got - ref).max() <= 0.04 * 1.0001  # onnxruntime may run this in float: at most 1 LSB


def test_unsupported_op_is_one_line_error():
    """An op that cannot run even as a float island (here: a custom domain) is named in one line; a standard op
    without an integer kernel (Sigmoid) becomes a float island instead (tests/cli/test_any_model.py)."""
    model = _qdq_model([helper.make_node("Sigmoid", ["xd"], ["f"], name="sig", domain="com.example")], [], [8])
    with pytest.raises(EdgeslimError) as err:
        import_qdq(model)
    msg = str(err.value)
    assert msg.startswith("ONNX op 'Sigmoid' (node 'sig') is not supported by the integer importer: ")
    assert "\n" not in msg


def test_unreadable_file_is_edgeslim_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EdgeslimError, match="cannot read ONNX model"):
        import_qdq(bad)


@pytest.mark.parametrize("depthwise", [False, True], ids=["group1", "depthwise"])
def test_conv_transpose_and_resize_match_onnxruntime(tmp_path, depthwise):
    """Q -> DQ -> ConvTranspose(DQ w per-channel, DQ int32 bias) -> Q -> DQ -> Resize -> Q -> Resize(codes) -> DQ."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(7)
    C, O, g = (4, 4, 4) if depthwise else (4, 6, 1)
    w = rng.integers(-127, 128, (C, O // g, 3, 3)).astype(np.int8)
    ws = rng.uniform(0.004, 0.02, 1 if depthwise else O).astype(np.float32)  # ONNX: per-axis only along axis 1
    s, so = np.float32(0.05), np.float32(0.04)
    bias = rng.integers(-2000, 2000, O).astype(np.int32)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "s": np.array(s), "z": np.array(128, np.uint8), "so": np.array(so), "zo": np.array(100, np.uint8),
        "w": w, "ws": ws, "wz": np.zeros(ws.size, np.int8), "b": bias,
        "bs": np.broadcast_to(s * ws, (O,)).astype(np.float32),
        "bz": np.zeros(O, np.int32), "scales": np.array([1, 1, 2, 2], np.float32),
        "sizes": np.array([2, O, 15, 13], np.int64)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
             helper.make_node("ConvTranspose", ["xd", "wd", "bd"], ["ct"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1], group=g),
             helper.make_node("QuantizeLinear", ["ct", "so", "zo"], ["ctq"]),
             helper.make_node("DequantizeLinear", ["ctq", "so", "zo"], ["ctd"]),
             helper.make_node("Resize", ["ctd", "", "scales"], ["r"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("QuantizeLinear", ["r", "so", "zo"], ["rq"]),
             helper.make_node("Resize", ["rq", "", "", "sizes"], ["r2"], mode="nearest",
                              coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor"),
             helper.make_node("DequantizeLinear", ["r2", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, O, 15, 13])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ct.onnx"
    onnx.save(model, str(path))
    g_int = import_qdq(path)
    assert [n.op for n in g_int.nodes] == ["QuantizeLinear", "QLinearConvTranspose", "Resize", "Resize",
                                           "DequantizeLinear"]
    x = (rng.standard_normal((2, C, 5, 5)) * 2).astype(np.float32)
    got = run(g_int, x)["y"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    assert got.shape == ref.shape == (2, O, 15, 13)
    equal = float(np.mean(got == ref))
    print(f"ConvTranspose + Resize ({'depthwise' if depthwise else 'group 1'}): {equal:.4f} equal to onnxruntime")
    assert np.abs(got - ref).max() <= so * 1.0001
    assert equal > 0.95
    # the integer accumulator itself is exact: compare the codes before the Resize with onnxruntime's Q output
    codes = run(g_int, x, return_codes=True)
    (ct_name,) = [n.outputs[0] for n in g_int.nodes if n.op == "QLinearConvTranspose"]
    assert codes[ct_name].shape == (2, O, 10, 10)


def test_uint8_weight_containers_read_back_as_the_int8_weights(tiny_model, tiny_calib, tmp_path):
    """Forced uint8 weight containers (q + 128, zero point 128: what AVX2-only CPUs get) import as the int8 codes
    with zero point 0, and `exact_on_host` rewrites any int8-weight QDQ file into such containers with the same
    dequantized weights (numpy) and the same imported integer graph."""
    from edgeslim.export.onnx_qdq import exact_on_host

    q = api.quantize(tiny_model, tiny_calib, PTQConfig())
    int8_path = api.export_onnx(q, tmp_path / "int8.onnx", weight_type="int8")
    u8_path = api.export_onnx(q, tmp_path / "u8.onnx", weight_type="uint8")
    ref, got = import_qdq(int8_path), import_qdq(u8_path)
    for a, b in zip([n for n in ref.nodes if "w" in n.arrays], [n for n in got.nodes if "w" in n.arrays]):
        assert np.array_equal(a.arrays["w"], b.arrays["w"]) and not b.arrays["w_zero_point"].any()
    rewritten, count = exact_on_host(onnx.load(str(int8_path)), "uint8")
    assert count == sum("w" in n.arrays for n in ref.nodes)

    def dequantized_weights(model):
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        out = {}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim >= 2:
                w, s, z = (inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64),
                           inits[n.input[2]].astype(np.float64))
                shape = [-1] + [1] * (w.ndim - 1)
                out[n.output[0]] = (w - z.reshape(shape)) * s.reshape(shape)
        return out

    before, after = dequantized_weights(onnx.load(str(int8_path))), dequantized_weights(rewritten)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    onnx.save(rewritten, str(tmp_path / "rewritten.onnx"))
    again = import_qdq(tmp_path / "rewritten.onnx")
    x = _x()
    assert all(np.array_equal(run(ref, x)[k], run(again, x)[k]) for k in ref.output_names)
