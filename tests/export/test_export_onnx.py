import numpy as np
import onnx
import pytest
import torch

import edgeslim
from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.eval import ort as ort_eval

CONFIGS = [
    dict(),
    dict(scheme="asymmetric"),
    dict(granularity="tensor"),
    dict(scale="pow2"),
    dict(scale="global"),
    dict(fuse=False),
    dict(calibrator="entropy"),
    dict(calibrator="mse", scheme="asymmetric"),
    dict(w_scheme="asymmetric", granularity="tensor"),
    dict(w_scheme="asymmetric", scheme="symmetric"),
    dict(calibrator="percentile"),
    dict(w_bits=4, a_bits=4),
    dict(w_bits=2, a_bits=3, scale="pow2"),
    dict(w_bits=12, a_bits=12),
    dict(w_bits=16, a_bits=16, scheme="asymmetric"),
    dict(w_bits=4, a_bits=8, granularity="tensor", algorithms=("cle", "bias-correction")),
]


def _quantize(model, calib, **cfg):
    return api.quantize(model, calib, PTQConfig(**cfg), batch_size=16)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_onnxruntime_matches_fake_quant_within_one_lsb(tiny_model, tiny_calib, tmp_path, cfg):
    q = _quantize(tiny_model, tiny_calib, **cfg)
    path = api.export_onnx(q, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(path))
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = q.model(x).numpy()
    got = ort_eval.predict(ort_eval.session(path), x.numpy())
    # float logits = dequantized int32 accumulator of the last layer: allow its inputs to be 1 LSB off
    fc = q.intgraph.nodes[-1]
    in_scale = q.intgraph.qparams[fc.inputs[0]].scale
    w_real = (fc.arrays["w"] - fc.arrays["w_zero_point"][:, None]) * fc.arrays["w_scale"][:, None]
    one_lsb = in_scale * np.abs(w_real).sum(axis=1).max()
    assert np.abs(got - expected).max() <= one_lsb + 1e-5


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.get("a_bits", 8) <= 8 and c.get("fuse", True)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_every_conv_and_add_runs_as_integer_kernel(tiny_model, tiny_calib, tmp_path, cfg):
    q = _quantize(tiny_model, tiny_calib, **cfg)
    path = api.export_onnx(q, tmp_path / "m.onnx")
    counts = ort_eval.optimized_op_counts(path)
    assert counts["QLinearConv"] == 3 and counts["Conv"] == 0
    assert counts["QLinearAdd"] == 2 and counts["Add"] == 0
    assert ort_eval.integer_convs(path) == (3, 3)


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_qdq_graph_stores_8bit_weights_and_int32_bias(tiny_model, tiny_calib, tmp_path, weight_type):
    q = _quantize(tiny_model, tiny_calib)
    path = api.export_onnx(q, tmp_path / "m.onnx", weight_type=weight_type)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    weights = [v for k, v in inits.items() if "_w__" in k and v.ndim == 4]
    biases = [v for k, v in inits.items() if "_b__" in k and v.ndim == 1 and v.dtype == np.int32]
    assert len(weights) == 3 and all(w.dtype == np.dtype(weight_type) for w in weights)
    assert len(biases) >= 3
    offset = 128 if weight_type == "uint8" else 0
    convs = [n for n in q.intgraph.nodes if n.op == "QLinearConv"]
    for w, node in zip(weights, convs):
        np.testing.assert_array_equal(w.astype(np.int32) - offset, node.arrays["w"])


def test_fp32_export_matches_torch(tiny_model, tmp_path):
    path = api.export_fp32_onnx(tiny_model, (3, 16, 16), tmp_path / "f.onnx")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = tiny_model(x).numpy()
    np.testing.assert_allclose(ort_eval.predict(ort_eval.session(path), x.numpy()), ref, atol=1e-4)


def test_fused_relu_uses_unsigned_range(tiny_model, tiny_calib):
    q = _quantize(tiny_model, tiny_calib)
    conv1 = next(n for n in q.intgraph.nodes if n.op == "QLinearConv")
    out = q.intgraph.qparams[conv1.outputs[0]]
    assert not out.signed and out.zero_point == 0  # ReLU output scale replaced the conv's (seed 001)


def test_default_w8a8_is_bit_exact_in_onnxruntime(tiny_model, tiny_calib, tmp_path):
    q = _quantize(tiny_model, tiny_calib)
    path = api.export_onnx(q, tmp_path / "m.onnx")
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = q.model(x).numpy()
    got = ort_eval.predict(ort_eval.session(path), x.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # same integer codes, same float epilogue


def test_auto_weight_container_keeps_int8_where_it_cannot_saturate():
    from edgeslim.export.onnx_qdq import host_weight_type, weight_container

    small = np.array([[-64, 3, 64]], np.int32)
    large = np.array([[-100, 3, 127]], np.int32)
    zp = np.zeros(1, np.int32)
    assert weight_container(small, zp, "auto")[0].dtype == np.int8  # 7-bit weights are exact everywhere
    assert weight_container(large, zp, "auto")[0].dtype == np.dtype(host_weight_type())
    w, z = weight_container(large, zp, "uint8")
    assert w.dtype == np.uint8 and (w.astype(int) - z.astype(int) == large).all()
    assert weight_container(large, zp, "int8")[0].dtype == np.int8


@pytest.mark.parametrize("weight_range", ["reduced", "full"])
def test_weight_range_reduced_is_int8_and_exact_in_onnxruntime(tiny_model, tiny_calib, tmp_path, weight_range):
    """``weight_range="reduced"`` puts 8-bit weights on the 7-bit grid, which stays in int8 containers (the fast
    u8s8 kernels) and which onnxruntime computes exactly even where those kernels saturate pair sums at int16
    (x86 with AVX2 and no VNNI); ``full`` keeps the 8-bit grid, stored as uint8 there. Oracle: the integer
    engine, element for element."""
    from edgeslim.cpu import int8_weights_saturate
    from edgeslim.engine.run import run
    from edgeslim.export.onnx_qdq import weight_containers

    config = PTQConfig(weight_range=weight_range)
    q = api.quantize(tiny_model, tiny_calib, config)
    layers = q.intgraph.layers()
    codes = np.concatenate([np.abs(n.arrays["w"]).ravel() for n in layers])
    assert {n.attrs["w_bits"] for n in layers} == {7 if weight_range == "reduced" else 8}
    assert codes.max() <= (64 if weight_range == "reduced" else 127) and codes.max() > 32
    saturating = weight_range == "full" and int8_weights_saturate()
    assert weight_containers(q.intgraph) == {("uint8" if saturating else "int8"): len(layers)}
    path = api.export_onnx(q, tmp_path / "m.onnx")
    x = np.random.default_rng(5).standard_normal((16, 3, 16, 16)).astype(np.float32)
    (name,) = q.intgraph.output_names
    np.testing.assert_array_equal(ort_eval.predict(ort_eval.session(path), x), run(q.intgraph, x)[name])
    assert PTQConfig().weight_range == ("reduced" if int8_weights_saturate() else "full")  # auto: this CPU


@pytest.mark.parametrize("weight_range", ["reduced", "full"])
def test_depthwise_convs_keep_int8_weights_on_the_8_bit_grid_exactly(tmp_path, weight_range):
    """onnxruntime's depthwise int8 kernel does not add products in pairs, so depthwise convs keep the 8-bit grid in
    int8 containers on every CPU (measured exact on AVX2 without VNNI, where a dense or grouped conv with the same
    weights is not), while dense and grouped convs follow ``weight_range``. Oracle: the integer engine."""
    from edgeslim.cpu import int8_weights_saturate
    from edgeslim.engine.run import run
    from edgeslim.export.onnx_qdq import is_depthwise, weight_containers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),  # depthwise
                                torch.nn.Conv2d(16, 32, 3, padding=1, groups=16), torch.nn.ReLU(),  # multiplier 2
                                torch.nn.Conv2d(32, 16, 3, padding=1, groups=4), torch.nn.ReLU(),  # grouped
                                torch.nn.Conv2d(16, 8, 1)).eval()
    rng = np.random.default_rng(0)
    q = api.quantize(model, rng.standard_normal((32, 3, 16, 16)).astype(np.float32),
                     PTQConfig(weight_range=weight_range), input_shape=(3, 16, 16))
    layers = q.intgraph.layers()
    dw = [is_depthwise(n) for n in layers]
    assert dw == [False, True, True, False, False]
    reduced = weight_range == "reduced"
    for n, d in zip(layers, dw):
        assert n.attrs["w_bits"] == (8 if d or not reduced else 7)
        assert np.abs(n.arrays["w"]).max() == (127 if d or not reduced else 63)
    saturating = int8_weights_saturate() and not reduced
    assert weight_containers(q.intgraph) == ({"int8": 2, "uint8": 3} if saturating else {"int8": 5})
    path = api.export_onnx(q, tmp_path / "m.onnx")
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32) * 2
    (name,) = q.intgraph.output_names
    np.testing.assert_array_equal(ort_eval.predict(ort_eval.session(path), x), run(q.intgraph, x)[name])


def test_depthwise_multiplier_conv_runs_as_a_fast_depthwise_kernel_bit_exact(tmp_path):
    """A depthwise conv with 3 outputs per input channel (what separable factorization writes) is exported as a
    channel repeat on codes + an m = 1 depthwise QLinearConv; onnxruntime's result equals the engine's, which
    computes the original grouped conv."""
    from edgeslim.engine.run import run

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 24, 3, padding=1, groups=8), torch.nn.ReLU(),
                                torch.nn.Conv2d(24, 16, 1)).eval()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    q = api.quantize(model, calib, PTQConfig(), input_shape=(3, 16, 16))
    path = api.export_onnx(q, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node if n.op_type == "Conv"]
    assert sorted(groups) == [1, 1, 24]
    assert [n.op_type for n in graph.node].count("Gather") == 1
    ops = ort_eval.optimized_op_counts(path)
    assert ops["QLinearConv"] == 3 and "Conv" not in ops and ops["DequantizeLinear"] == 1  # the model output
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    (name,) = q.intgraph.output_names
    np.testing.assert_array_equal(ort_eval.predict(ort_eval.session(path), x), run(q.intgraph, x)[name])
    back = edgeslim.import_qdq(path)  # the repeat reads back as a Gather on codes: the engine still matches
    np.testing.assert_array_equal(run(back, x)[back.output_names[0]], run(q.intgraph, x)[name])
