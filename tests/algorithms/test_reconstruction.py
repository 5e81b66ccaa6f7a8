"""AdaRound and BRECQ: rounding stays on the grid, blocks never get worse than round-to-nearest, exports agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import api
from edgeslim.algorithms import ptq
from edgeslim.algorithms.reconstruction import (
    _collect, _Runner, _unit_error, beta_at, block_units, init_rounding_variable, layer_units,
    rectified_sigmoid)
from edgeslim.config import MixedPlan, PTQConfig, Reconstruction
from edgeslim.errors import EdgeslimError
from edgeslim.eval import ort as ort_eval
from edgeslim.graph import ops
from edgeslim.quant import primitives as P
from edgeslim.quant.modules import ActQuant, QuantConv2d, QuantLinear


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class Net(nn.Module):
    """A stem, two residual blocks (BRECQ's units), a head: the shape of a CIFAR ResNet in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    m = Net().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((96, 3, 12, 12)).astype(np.float32))


def _weighted(q):
    return [(str(n.target), ops.module(q.model, n)) for n in ptq.weighted_nodes(q.model)]


@pytest.mark.slow  # 17-23 s each: the fast suite's two slowest tests
@pytest.mark.parametrize("method", ["adaround", "brecq"])
def test_learned_codes_stay_within_floor_and_ceil(net, calib, method):
    q = api.quantize(net, calib, PTQConfig(w_bits=3, a_bits=8, algorithms=(method,), iters=60))
    changed = 0
    kept = {layer: r["kept"] for r in q.reports[method] for layer in r["layers"]}
    assert sum(kept.values()) >= 3  # most units improve on round-to-nearest
    for name, mod in _weighted(q):
        assert (getattr(mod, "round_up", None) is not None) == kept[name], name  # a unit not kept is RTN again
        w = mod.weight.detach().double().numpy()
        s = mod.w_scale.detach().double().numpy().reshape((-1,) + (1,) * (w.ndim - 1))
        t = w / s  # numpy oracle of the grid position
        codes = mod.weight_int().numpy()
        lo, hi = np.clip(np.floor(t), mod.w_qmin, mod.w_qmax), np.clip(np.ceil(t), mod.w_qmin, mod.w_qmax)
        assert np.all((codes == lo) | (codes == hi)), name
        changed += int((codes != np.clip(np.round(t), mod.w_qmin, mod.w_qmax)).sum())
        # the fake-quant weights are exactly the codes on the grid
        s32 = mod.w_scale.detach().numpy().astype(np.float32).reshape(s.shape)
        np.testing.assert_allclose(mod.fq_weight().detach().numpy(), codes.astype(np.float32) * s32, rtol=2e-7, atol=0)
    assert changed > 0  # learned rounding is not round-to-nearest
    assert set(q.reports) == {method}


def test_brecq_never_worse_than_round_to_nearest_per_block(net, calib):
    cfg = dict(w_bits=2, a_bits=4)
    rtn = api.quantize(net, calib, PTQConfig(**cfg))
    rec = api.quantize(net, calib, PTQConfig(**cfg, algorithms=("brecq",), iters=80))
    units = block_units(rec.model)
    assert [u.name for u in units] == ["stem", "layer.0", "layer.1", "fc"]
    assert [len(u.layers) for u in units] == [1, 2, 2, 1]
    rtn_scales = {n: m.scale.clone() for n, m in rtn.model.named_modules() if isinstance(m, ActQuant)}
    runner = _Runner(rec.model)
    x = calib
    for unit in units:  # recomputed here, independently of the reports
        ptq.set_mode(rec.model, "off")
        (target,) = _collect(runner, x, [unit.output])
        ptq.set_mode(rec.model, "quant")
        inputs = _collect(runner, x, unit.inputs)
        learned = _unit_error(runner, unit, inputs, target)
        saved = {}
        for n in unit.nodes:
            m = ops.module(rec.model, n)
            if isinstance(m, (QuantConv2d, QuantLinear)):
                saved[n] = m.round_up.clone() if getattr(m, "round_up", None) is not None else None
                m.set_rounding(None)
            elif isinstance(m, ActQuant):
                saved[n] = m.scale.clone()
                m.scale.copy_(rtn_scales[str(n.target)])
        nearest = _unit_error(runner, unit, inputs, target)
        for n, v in saved.items():  # put the learned state back for the next unit's inputs
            m = ops.module(rec.model, n)
            m.set_rounding(v) if isinstance(m, (QuantConv2d, QuantLinear)) else m.scale.copy_(v)
        ptq.refresh_input_scales(rec.model)
        assert learned <= nearest * (1 + 1e-3), unit.name
    reports = rec.reports["brecq"]
    assert all(r["mse"] <= r["mse_rtn"] for r in reports)
    assert any(r["kept"] and r["mse"] < 0.95 * r["mse_rtn"] for r in reports)  # it does learn something


def test_brecq_learns_activation_scales_and_adaround_does_not(net, calib):
    base = api.quantize(net, calib, PTQConfig(w_bits=4, a_bits=4))
    scales = lambda q: [float(m.scale) for m in ptq.act_quants(q.model)]  # noqa: E731
    ada = api.quantize(net, calib, PTQConfig(w_bits=4, a_bits=4, algorithms=("adaround",), iters=40))
    assert scales(ada) == scales(base)
    brecq = api.quantize(net, calib, PTQConfig(w_bits=4, a_bits=4, algorithms=("brecq",), iters=40))
    assert scales(brecq) != scales(base)
    # the int32 bias scale follows the learned input scale
    for n in ptq.weighted_nodes(brecq.model):
        assert float(ops.module(brecq.model, n).input_scale) == float(ptq.input_quant(brecq.model, n).scale)
    pow2 = api.quantize(net, calib, PTQConfig(w_bits=4, a_bits=4, scale="pow2", algorithms=("brecq",), iters=20))
    for s in scales(pow2):  # bit-shift scales stay powers of two: not learned
        assert float(np.log2(s)) == round(float(np.log2(s)))


@pytest.mark.parametrize("cfg", [
    dict(w_bits=4, a_bits=4, algorithms=("brecq",)),
    dict(w_bits=4, a_bits=8, granularity="tensor", algorithms=("cle", "adaround", "bias-correction")),
    dict(w_bits=3, a_bits=8, scale="pow2", algorithms=("adaround",)),
    dict(w_bits=4, a_bits=8, algorithms=("brecq",), fisher=True),
], ids=["brecq-w4a4", "cle-adaround-bc", "adaround-pow2", "brecq-fisher"])
def test_onnxruntime_runs_the_learned_codes(net, calib, tmp_path, cfg):
    q = api.quantize(net, calib, PTQConfig(**cfg, iters=30))
    path = api.export_onnx(q, tmp_path / "m.onnx")
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = q.model(x).numpy()
    got = ort_eval.predict(ort_eval.session(path), x.numpy())
    fc = q.intgraph.nodes[-1]
    w_real = (fc.arrays["w"] - fc.arrays["w_zero_point"][:, None]) * fc.arrays["w_scale"][:, None]
    one_lsb = q.intgraph.qparams[fc.inputs[0]].scale * np.abs(w_real).sum(axis=1).max()
    assert np.abs(got - expected).max() <= one_lsb + 1e-5
    # the exported weight codes are the learned ones
    stem = next(n for n in q.intgraph.nodes if n.arrays.get("w") is not None)
    mod = q.model.get_submodule("stem")
    np.testing.assert_array_equal(stem.arrays["w"], mod.weight_int().numpy())


def test_mixed_plan_float_layers_are_left_alone(net, calib):
    plan = MixedPlan.from_dict({"layers": {"layer.1.*": "fp32"}})
    q = api.quantize(net, calib, PTQConfig(w_bits=4, a_bits=8, algorithms=("brecq",), iters=20), plan=plan)
    reconstructed = {layer for r in q.reports["brecq"] for layer in r["layers"]}
    for name, mod in _weighted(q):
        is_float = name.startswith("layer.1.")
        assert mod.spec.is_float == is_float
        assert (name in reconstructed) == (not is_float), name
        if is_float:
            assert getattr(mod, "round_up", None) is None


def test_relaxation_primitives_match_their_definitions():
    frac = torch.rand(1000)
    assert torch.allclose(rectified_sigmoid(init_rounding_variable(frac)), frac, atol=1e-4)
    x = torch.randn(6, 5, 3, 3)
    scale = torch.rand(6) * 0.1 + 0.01
    zp = torch.zeros(6, dtype=torch.int64)
    up = torch.rand(x.shape) > 0.5
    hard = P.dequantize(P.quantize_directed(x, scale, zp, -8, 7, 0, up), scale, zp, 0)
    assert torch.equal(P.fake_quantize_soft(x, scale, zp, -8, 7, 0, up.float()), hard)
    # LSQ: forward equals torch's fake-quant, gradients equal torch's learnable fake-quant
    a = torch.randn(4000) * 3
    s = torch.tensor([0.05], requires_grad=True)
    ref_s = torch.tensor([0.05], requires_grad=True)
    zp1 = torch.tensor([3])
    xa, xb = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    ours = P.fake_quantize_lsq(xa, s, zp1, 0, 255)
    ref = torch._fake_quantize_learnable_per_tensor_affine(xb, ref_s, zp1.float(), 0, 255, 1.0)
    assert torch.equal(ours, ref)
    g = torch.randn(4000)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=0)  # g * s / s: one rounding
    assert torch.allclose(s.grad, ref_s.grad, rtol=1e-4)
    settings = Reconstruction(iters=100)
    assert beta_at(10, settings) is None and beta_at(20, settings) == 20.0 and beta_at(99, settings) < 2.3


def test_units_cover_every_integer_layer_once(net, calib):
    q = api.quantize(net, calib, PTQConfig())
    names = [str(n.target) for n in ptq.weighted_nodes(q.model)]
    assert [u.name for u in layer_units(q.model)] == names
    assert sorted(sum((u.layers for u in block_units(q.model)), [])) == sorted(names)


def test_configuration_errors():
    with pytest.raises(EdgeslimError, match="choose one"):
        PTQConfig(algorithms=("adaround", "brecq"))
    with pytest.raises(EdgeslimError, match="--iters"):
        PTQConfig(algorithms=("brecq",), iters=0)
    with pytest.raises(EdgeslimError, match="--fisher"):
        PTQConfig(algorithms=("adaround",), fisher=True)
    # documented order whatever the order given
    assert PTQConfig(algorithms=("bias-correction", "adaround", "cle")).algorithms == ("cle", "adaround", "bias-correction")
