"""Detector operations in the integer graph: SiLU / sigmoid / leaky ReLU as code tables, nearest upsampling,
splits, reshape / transpose channel shuffles, multi-output heads.

Oracles: the fake-quant simulation (PyTorch), the numpy engine and onnxruntime on the exported QDQ model must
agree on every output to the code (the output codes are compared in LSBs of the output scale).
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim import api
from edgeslim.config import MixedPlan, PTQConfig
from edgeslim.engine import run as engine
from edgeslim.eval import ort as ort_eval


class ConvBnAct(nn.Module):
    def __init__(self, c_in, c_out, k=3, s=1, act=None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TinyDetector(nn.Module):
    """The shapes of a YOLO-style detector: SiLU convs, a split bottleneck, SPPF pooling, upsample + concat,
    a channel shuffle, other activations, and two raw head outputs."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBnAct(3, 8, 3, 2)
        self.down = ConvBnAct(8, 16, 3, 2, act=nn.LeakyReLU(0.1))
        self.b1 = ConvBnAct(8, 8, 1, act=nn.Hardswish())
        self.b2 = ConvBnAct(8, 8, 3, act=nn.Sigmoid())
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.mix = ConvBnAct(32, 16, 1, act=nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = ConvBnAct(24, 16, 3, act=nn.GELU())
        self.head_small = nn.Conv2d(16, 6, 1)
        self.head_large = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        s = self.stem(x)                                  # 8 x H/2
        d = self.down(s)                                  # 16 x H/4
        a, b = torch.split(d, 8, dim=1)
        b = b + self.b2(self.b1(b))
        p1 = self.pool(a)
        p2 = self.pool(p1)
        y = self.mix(torch.cat([a, b, p1, p2], 1))        # 16 x H/4
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        u = self.fuse(torch.cat([self.up(y), s], 1))      # 16 + 8 at H/2
        return self.head_large(u), self.head_small(y)


def _calib(n=48, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _all_outputs(path, x):
    sess = ort_eval.session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("activations", ["table", "float"])
@pytest.mark.parametrize("cfg", [dict(), dict(scheme="asymmetric"), dict(w_bits=4, a_bits=4), dict(scale="pow2")],
                         ids=["default", "asym", "w4a4", "pow2"])
def test_detector_ops_agree_across_simulation_engine_and_onnxruntime(tmp_path, cfg, activations):
    torch.manual_seed(0)
    model = _randomize_bn(TinyDetector())
    q = api.quantize(model, _calib(), PTQConfig(**cfg), batch_size=16)
    ops_in_graph = {n.op for n in q.intgraph.nodes}
    assert {"LUT", "Resize", "Reshape", "Transpose", "Slice", "MaxPool", "QLinearConcat"} <= ops_in_graph
    assert not q.intgraph.is_mixed()
    x = _calib(8, seed=3)
    with torch.no_grad():
        sim = [t.numpy() for t in q.model(x)]
    eng = engine.run(q.intgraph, x.numpy())
    path = api.export_onnx(q, tmp_path / "m.onnx", activations=activations)
    got = _all_outputs(path, x.numpy())
    for name, s, o in zip(q.intgraph.output_names, sim, got):
        scale = q.intgraph.qparams[name.removesuffix("_float")].scale
        assert np.abs(eng[name] - s).max() <= scale * 1.01  # engine vs simulation: at most 1 LSB
        if activations == "table":  # integer tables in ONNX: onnxruntime computes the engine's codes
            assert np.abs(o - eng[name]).max() <= scale * 1e-3
        else:  # float activations: float32 rounding ties may move a code by one
            assert np.abs(o - eng[name]).max() <= scale * 1.01
            assert (np.abs(o - eng[name]) > scale * 0.5).mean() < 0.01
        assert np.abs(o - s).max() <= scale * 1.01


def test_activation_tables_run_as_gather_on_codes_and_convs_stay_integer(tmp_path):
    model = _randomize_bn(TinyDetector())
    q = api.quantize(model, _calib(), PTQConfig(), batch_size=16)
    luts = [n for n in q.intgraph.nodes if n.op == "LUT"]
    assert sorted({n.attrs["fn"] for n in luts}) == ["gelu", "hardswish", "leaky_relu", "sigmoid", "silu"]
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    table = ort_eval.optimized_op_counts(api.export_onnx(q, tmp_path / "t.onnx", activations="table"))
    assert table["QLinearConv"] == n_conv and table["Conv"] == 0
    assert table["Gather"] == len(luts)
    floats = ort_eval.optimized_op_counts(api.export_onnx(q, tmp_path / "f.onnx"))
    assert floats["QLinearConv"] == n_conv and floats["Conv"] == 0 and floats["Gather"] == 0
    assert floats["QLinearSigmoid"] + floats["Sigmoid"] >= 1 and floats["QLinearLeakyRelu"] == 1


def test_lut_table_equals_numpy_definition_of_silu():
    model = _randomize_bn(TinyDetector())
    q = api.quantize(model, _calib(), PTQConfig(), batch_size=16)
    node = next(n for n in q.intgraph.nodes if n.op == "LUT" and n.attrs["fn"] == "silu")
    qx, qy = q.intgraph.qparams[node.inputs[0]], q.intgraph.qparams[node.outputs[0]]
    codes = np.arange(qx.qmin, qx.qmax + 1)
    x = ((codes - qx.zero_point) * np.float32(qx.scale)).astype(np.float64)
    y = x / (1 + np.exp(-x))
    expected = np.clip(np.rint(y / qy.scale) + qy.zero_point, qy.qmin, qy.qmax)
    assert np.abs(node.arrays["table"] - expected).max() <= 1  # float32 vs float64 at rounding ties


def test_float_island_activation_and_upsample_in_a_mixed_plan(tmp_path):
    model = _randomize_bn(TinyDetector())
    plan = MixedPlan.from_dict({"layers": {"fuse.*": "fp32", "b2.*": "fp16"}})
    q = api.quantize(model, _calib(), PTQConfig(), plan=plan, batch_size=16)
    assert q.intgraph.is_mixed()
    x = _calib(4, seed=5)
    with torch.no_grad():
        sim = [t.numpy() for t in q.model(x)]
    path = api.export_onnx(q, tmp_path / "m.onnx")
    got = _all_outputs(path, x.numpy())
    eng = engine.run(q.intgraph, x.numpy())
    for name, s, o in zip(q.intgraph.output_names, sim, got):
        scale = q.intgraph.qparams[name.removesuffix("_float")].scale
        assert np.abs(o - s).max() <= scale * 1.01 + 1e-5
        assert np.abs(eng[name] - o).max() <= scale * 1.01 + 1e-5


class ChunkSelect(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = self.c(x).chunk(2, dim=1)
        y = torch.cat([F.relu(a), self.d(b)], 1)
        return y.permute(0, 2, 3, 1), torch.select(y, 1, 5), y[:, 3]


def test_chunk_permute_and_select_are_data_movement(tmp_path):
    x = _calib(16, size=8)
    q = api.quantize(ChunkSelect().eval(), x, PTQConfig(), batch_size=8)
    assert {"Slice", "Transpose", "Gather"} <= {n.op for n in q.intgraph.nodes}
    path = api.export_onnx(q, tmp_path / "m.onnx")
    got = _all_outputs(path, x.numpy())
    with torch.no_grad():
        sim = [t.numpy() for t in q.model(x)]
    eng = engine.run(q.intgraph, x.numpy())
    assert [o.shape for o in got] == [s.shape for s in sim] == [(16, 8, 8, 8), (16, 8, 8), (16, 8, 8)]
    for name, s, o in zip(q.intgraph.output_names, sim, got):
        scale = q.intgraph.qparams[name.removesuffix("_float")].scale
        assert np.abs(o - s).max() <= scale * 1.01
        assert np.array_equal(eng[name], o)


class SoftmaxHead(nn.Module):
    """FastestDet's head: objectness through a sigmoid, boxes raw, classes through a softmax, concatenated."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 1 + 4 + 5, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 2)

    def forward(self, x):
        y = self.c(F.pad(x, (1, 1, 1, 1)))
        y = self.pool(y)
        return torch.cat([y[:, :1].sigmoid(), y[:, 1:5], F.softmax(y[:, 5:], dim=1)], 1)


def test_softmax_runs_in_float_between_quantized_tensors(tmp_path):
    x = _calib(16, size=12)
    q = api.quantize(SoftmaxHead().eval(), x, PTQConfig(), batch_size=8)
    ops_in_graph = [n.op for n in q.intgraph.nodes]
    assert "Softmax" in ops_in_graph and "QLinearAveragePool" in ops_in_graph and "LUT" in ops_in_graph
    path = api.export_onnx(q, tmp_path / "m.onnx")
    got = _all_outputs(path, x.numpy())[0]
    with torch.no_grad():
        sim = q.model(x).numpy()
    name = q.intgraph.output_names[0]
    scale = q.intgraph.qparams[name.removesuffix("_float")].scale
    assert np.abs(got - sim).max() <= scale * 1.01
    assert np.abs(engine.run(q.intgraph, x.numpy())[name] - got).max() <= scale * 1.01


class PaddedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 2, 1)  # FastestDet's neck pool: padding counted in the average
        self.d = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.d(self.pool(self.c(x)))


@pytest.mark.parametrize("plan", [None, {"layers": {"d": "fp32", "c": "fp32"}}], ids=["int8", "float-island"])
def test_padded_average_pool_integer_and_in_a_float_island(tmp_path, plan):
    x = _calib(8, size=12)
    q = api.quantize(PaddedPool().eval(), x, PTQConfig(), plan=MixedPlan.from_dict(plan) if plan else None,
                     batch_size=8)
    path = api.export_onnx(q, tmp_path / "m.onnx")
    got = _all_outputs(path, x.numpy())[0]
    with torch.no_grad():
        sim = q.model(x).numpy()
    name = q.intgraph.output_names[0]
    tol = 1e-4 if plan else q.intgraph.qparams[name.removesuffix("_float")].scale * 1.01
    assert np.abs(got - sim).max() <= tol
    assert np.abs(engine.run(q.intgraph, x.numpy())[name] - got).max() <= tol


def test_a_plan_keeping_everything_fp32_gives_the_float_model_outputs(tmp_path):
    """Model outputs take their producer's precision: an FP32 head does not end in an 8-bit quantizer."""
    model = _randomize_bn(TinyDetector())
    plan = MixedPlan.from_dict({"layers": {"*": "fp32"}})
    q = api.quantize(model, _calib(), PTQConfig(), plan=plan, batch_size=16)
    x = _calib(4, seed=9)
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    got = _all_outputs(api.export_onnx(q, tmp_path / "m.onnx"), x.numpy())
    for r, o in zip(ref, got):
        assert np.abs(r - o).max() < 1e-4
    head_only = api.quantize(model, _calib(), PTQConfig(), plan=MixedPlan.from_dict({"layers": {"head_*": "fp32"}}),
                             batch_size=16)
    g = head_only.intgraph
    producers = {n.outputs[0]: n.op for n in g.nodes}
    assert [producers[name] for name in g.output_names] == ["Cast", "Cast"]  # float outputs, no DequantizeLinear
    uniform = api.quantize(model, _calib(), PTQConfig(), batch_size=16).intgraph
    assert [{n.outputs[0]: n.op for n in uniform.nodes}[o] for o in uniform.output_names] == ["DequantizeLinear"] * 2
