import numpy as np
import torch

from edgeslim import api
from edgeslim.config import PTQConfig
from edgeslim.report.encodings import encodings


def test_pow2_scales_make_every_requantization_a_shift(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(scale="pow2", scheme="symmetric"))
    layers = [n for n in q.intgraph.layers() if "multiplier" in n.arrays]
    assert layers
    for node in layers:
        assert np.all(node.arrays["m0"] == 2**30)  # m0 * 2^-shift with a power-of-two multiplier
        np.testing.assert_array_equal(node.arrays["multiplier"], 2.0 ** (30 - node.arrays["shift"]))


def test_fixed_point_multiplier_matches_real_multiplier(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig())
    for node in q.intgraph.layers():
        if "multiplier" in node.arrays:
            approx = node.arrays["m0"] * 2.0 ** (-node.arrays["shift"].astype(float))
            np.testing.assert_allclose(approx, node.arrays["multiplier"], rtol=2**-30)


def test_global_scale_is_one_scale_for_all_activations(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(scale="global"))
    scales = {qp.scale for qp in q.intgraph.qparams.values()}
    assert len(scales) == 1 and all(qp.signed for qp in q.intgraph.qparams.values())


def test_weights_are_integers_in_range(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(w_bits=4))
    for node in q.intgraph.layers():
        w = node.arrays["w"]
        assert w.min() >= -8 and w.max() <= 7
        assert node.arrays["bias"].dtype == np.int64 and np.abs(node.arrays["bias"]).max() < 2**31


def test_no_fuse_adds_a_requantization_per_relu(tiny_model, tiny_calib):
    fused = api.quantize(tiny_model, tiny_calib, PTQConfig(fuse=True)).intgraph
    unfused = api.quantize(tiny_model, tiny_calib, PTQConfig(fuse=False)).intgraph
    assert sum(n.op == "QLinearRelu" for n in fused.nodes) == 0
    assert sum(n.op == "QLinearRelu" for n in unfused.nodes) == 3  # conv1, and the two residual ReLUs


def test_integer_weights_reproduce_fake_quant_weights(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig())
    conv = q.model.get_submodule(q.intgraph.layers()[0].attrs["module"])
    node = q.intgraph.layers()[0]
    w = (node.arrays["w"] - node.arrays["w_zero_point"][:, None, None, None]) * \
        node.arrays["w_scale"][:, None, None, None]
    assert torch.equal(torch.from_numpy(w.astype(np.float32)), conv.fq_weight())


def test_encodings_cover_every_tensor(tiny_model, tiny_calib):
    q = api.quantize(tiny_model, tiny_calib, PTQConfig())
    enc = encodings(q.intgraph)
    assert set(enc["activations"]) == set(q.intgraph.qparams)
    weights = [k for k in enc["parameters"] if k.endswith(".weight")]
    assert len(weights) == len(q.intgraph.layers()) == 4
