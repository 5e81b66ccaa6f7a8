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


def test_float_islands_are_exported_once_per_model_and_again_when_their_weights_change(monkeypatch):
    """A search lowers the same model once per candidate: each float island (here PReLU, which has no integer form)
    is exported by torch.onnx once and reused; a changed weight (a training step) exports it again, and the island
    computes the new PReLU (torch's) in onnxruntime."""
    import onnxruntime as ort
    from torch import nn

    from edgeslim.algorithms import ptq
    from edgeslim.lower import lower

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4), nn.Conv2d(4, 2, 1)).eval()
    calib = torch.randn(8, 3, 8, 8)
    config = PTQConfig()
    gm = ptq.prepare(model, (3, 8, 8), config)
    ptq.calibrate(gm, lambda: [calib])
    gm = ptq.freeze(gm, config)
    calls = []
    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or real_export(*a, **k))

    def islands():
        return [n for n in lower(gm, (3, 8, 8)).nodes if n.op == "FloatIsland"]

    first = islands()
    assert len(first) == 1 and len(calls) == 1
    again = islands()
    assert len(calls) == 1 and again[0].arrays["onnx"].tobytes() == first[0].arrays["onnx"].tobytes()

    prelu = next(m for m in gm.modules() if isinstance(m, nn.PReLU))
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.5, -0.25, 2.0, 0.0]))
    changed = islands()
    assert len(calls) == 2
    islands()
    assert len(calls) == 2  # the changed island is the one kept
    sess = ort.InferenceSession(changed[0].arrays["onnx"].tobytes(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 4, 8, 8)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, prelu(x).numpy(), rtol=1e-6, atol=1e-6)
