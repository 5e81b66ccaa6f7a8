"""Conv factorization (seed 003 G2): exact at full rank, SVD-optimal below it (numpy oracle), MACs as the
formula says, and a factorized ResNet-20 that traces, exports and matches onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.algorithms.factorize import (FactorizeRecord, bottleneck, choose_layers, composed_weight,
                                           conv_macs, depthwise_separable, factorize, factorized_macs, full_rank,
                                           rank_for)
from edgeslim.api import export_fp32_onnx
from edgeslim.errors import EdgeslimError
from edgeslim.eval.profile import profile
from edgeslim.graph.capture import capture
from edgeslim.models.resnet_cifar import resnet20

# (in, out, kernel, stride, padding, dilation, bias, padding_mode)
CONV_CASES = [
    (4, 6, 3, 1, 1, 1, True, "zeros"),
    (5, 7, 3, 2, 1, 1, False, "zeros"),
    (3, 12, 3, 1, 2, 2, True, "zeros"),
    (6, 4, (3, 5), 2, (1, 2), 1, True, "zeros"),
    (4, 5, 3, 1, 1, 1, False, "reflect"),
]


def _conv(case, seed=0) -> nn.Conv2d:
    i, o, k, s, p, d, bias, mode = case
    torch.manual_seed(seed)
    return nn.Conv2d(i, o, k, stride=s, padding=p, dilation=d, bias=bias, padding_mode=mode).eval()


def _x(c, h=11, w=13, seed=1):
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CONV_CASES)
def test_full_rank_separable_and_bottleneck_reproduce_the_conv(case):
    conv = _conv(case)
    x = _x(conv.in_channels)
    with torch.no_grad():
        ref = conv(x)
        for seq, rank in ((depthwise_separable(conv, full_rank(conv, "separable")), full_rank(conv, "separable")),
                          (bottleneck(conv, full_rank(conv, "bottleneck")), full_rank(conv, "bottleneck"))):
            out = seq(x)
            assert out.shape == ref.shape
            assert (out - ref).abs().max() < 1e-5
            assert torch.allclose(composed_weight(seq), conv.weight.double(), atol=1e-6)
    sep = depthwise_separable(conv, 2)
    assert sep[0].groups == conv.in_channels and sep[0].out_channels == 2 * conv.in_channels
    assert sep[0].stride == conv.stride and sep[0].dilation == conv.dilation and sep[0].bias is None
    assert (sep[1].bias is not None) == (conv.bias is not None)


def test_composed_weight_is_the_function_the_sequential_computes():
    conv = _conv(CONV_CASES[2])
    x = _x(conv.in_channels).double()
    for seq in (depthwise_separable(conv, 1), bottleneck(conv, 2)):
        seq = seq.double()
        bias = seq[1].bias
        want = F.conv2d(x, composed_weight(seq), bias, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation)
        with torch.no_grad():
            assert torch.allclose(seq(x), want, atol=1e-12)


def _numpy_separable_error(w: np.ndarray, m: int) -> float:
    o, i = w.shape[:2]
    resid = 0.0
    for c in range(i):
        s = np.linalg.svd(w[:, c].reshape(o, -1), compute_uv=False)
        resid += float(np.sum(s[m:] ** 2))
    return np.sqrt(resid) / np.linalg.norm(w)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_separable_init_error_is_the_per_channel_svd_optimum(m):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    torch.manual_seed(3)
    w = conv.weight.detach().double().numpy()
    sep = depthwise_separable(conv, m)
    err = float(torch.linalg.norm(composed_weight(sep) - torch.from_numpy(w)) / np.linalg.norm(w))
    expected = _numpy_separable_error(w, m)
    assert 0.0 < expected < 1.0
    assert err == pytest.approx(expected, rel=1e-6, abs=1e-7)  # weights are stored in float32


def test_bottleneck_truncation_is_numpys_optimal_rank_r_approximation():
    torch.manual_seed(4)
    for conv in (nn.Conv2d(12, 10, 3), nn.ConvTranspose2d(12, 10, 3, stride=2)):
        w = conv.weight.detach().double()
        is_t = isinstance(conv, nn.ConvTranspose2d)
        mat = (w.reshape(12, -1).T if is_t else w.permute(0, 2, 3, 1).reshape(-1, 12)).numpy()  # (O*k2, I)
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        for r in (1, 3, 7):
            seq = bottleneck(conv.double(), r)
            approx = composed_weight(seq)
            got = (approx.reshape(12, -1).T if is_t else approx.permute(0, 2, 3, 1).reshape(-1, 12)).numpy()
            best = (u[:, :r] * s[:r]) @ vt[:r]
            np.testing.assert_allclose(got, best, atol=1e-10)
            err = np.linalg.norm(got - mat) / np.linalg.norm(mat)
            assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(s), rel=1e-9)


@pytest.mark.parametrize("stride, padding, output_padding, dilation", [(2, 1, 1, 1), (2, 2, 0, 2), (1, 0, 0, 1)])
def test_conv_transpose_bottleneck_is_exact_at_full_rank(stride, padding, output_padding, dilation):
    torch.manual_seed(5)
    deconv = nn.ConvTranspose2d(6, 5, 3, stride=stride, padding=padding, output_padding=output_padding,
                                dilation=dilation).eval()
    x = _x(6, 7, 9)
    seq = bottleneck(deconv, full_rank(deconv, "bottleneck"))
    assert full_rank(deconv, "bottleneck") == 6 and isinstance(seq[1], nn.ConvTranspose2d)
    with torch.no_grad():
        ref, out = deconv(x), seq(x)
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
    assert seq[1].output_padding == deconv.output_padding


def test_macs_match_the_formula_the_profiler_and_the_reduction_knob():
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1)
    hw = (15, 15)  # -> 8 x 8 out
    assert conv_macs(conv, hw) == 8 * 8 * 48 * 32 * 9
    assert factorized_macs(conv, hw, method="separable", rank=2) == 8 * 8 * 2 * 32 * (9 + 48)
    assert factorized_macs(conv, hw, method="bottleneck", rank=5) == 15 * 15 * 32 * 5 + 8 * 8 * 48 * 5 * 9
    deconv = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
    assert conv_macs(deconv, (5, 6)) == 5 * 6 * 16 * 8 * 16
    assert factorized_macs(deconv, (5, 6), method="bottleneck", rank=3) == 5 * 6 * (16 * 3 + 3 * 8 * 16)
    for method, build in (("separable", depthwise_separable), ("bottleneck", bottleneck)):
        for frac in (0.2, 0.5, 0.8):
            r = rank_for(conv, hw, method=method, macs_reduction=frac)
            assert factorized_macs(conv, hw, method=method, rank=r) <= frac * conv_macs(conv, hw)
            assert factorized_macs(conv, hw, method=method, rank=r + 1) > frac * conv_macs(conv, hw)  # largest
            gm = capture(nn.Sequential(build(conv, r)), (32, *hw))  # the profiler measures the built layers
            assert sum(row.macs for row in profile(gm)) == factorized_macs(conv, hw, method=method, rank=r)
    assert rank_for(conv, hw, method="separable", macs_reduction=0.5) == 3  # floor(0.5*48*9/57) = floor(3.79)
    for method in ("separable", "bottleneck"):  # exactness always costs more than the conv itself
        assert factorized_macs(conv, hw, method=method, rank=full_rank(conv, method)) > conv_macs(conv, hw)


def test_resnet20_factorization_picks_heavy_convs_traces_exports_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = resnet20().eval()
    shape = (3, 32, 32)
    chosen = choose_layers(model, shape, share=0.5)
    heavy = 32 * 32 * 16 * 16 * 9
    gm = capture(model, shape)
    macs = {row.name: row.macs for row in profile(gm)}
    assert len(chosen) == 9 and all(macs[n] == heavy for n in chosen)
    assert chosen[:5] == ["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2"]
    total_conv = sum(v for k, v in macs.items() if "conv" in k)
    assert sum(macs[n] for n in chosen) >= 0.5 * total_conv > sum(macs[n] for n in chosen[:-1])
    assert choose_layers(model, shape, top_k=2) == chosen[:2]

    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for method in ("separable", "bottleneck"):
        new, rec = factorize(model, shape, method=method, macs_reduction=0.5)
        assert isinstance(rec, FactorizeRecord) and [lay.name for lay in rec.layers] == chosen
        assert json.loads(rec.to_json())["layers"][0]["method"] == method
        for lay in rec.layers:
            assert lay.macs_after <= 0.5 * lay.macs_before and lay.params_after < lay.params_before
            assert 0.0 < lay.weight_rel_error < 1.0 and lay.output_sqnr_db is not None
        saved = sum(lay.macs_before - lay.macs_after for lay in rec.layers)
        assert rec.model_macs_after == rec.model_macs_before - saved < rec.model_macs_before
        new_gm = capture(new, shape)  # still traces; BN stays after the Sequential
        assert sum(row.macs for row in profile(new_gm)) == rec.model_macs_after
        targets = [str(n.target) for n in new_gm.graph.nodes if n.op == "call_module"]
        assert targets.index("layer3.0.conv2.1") + 1 == targets.index("layer3.0.bn2")
        assert isinstance(model.layer3[0].conv2, nn.Conv2d)  # the input model is untouched

        path = export_fp32_onnx(new, shape, tmp_path / f"{method}.onnx")
        n_conv = sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)
        assert n_conv == 19 + 9
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = new(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, atol=1e-4, rtol=0)


class DeconvHead(nn.Module):
    """A PoseResNet-like head: conv, deconv + BN + ReLU, 1x1 to heatmaps (seed 003's case study)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.deconv(F.relu(self.conv(x))))))


def test_factorize_with_a_rank_at_full_rank_keeps_the_model_and_handles_deconvs():
    torch.manual_seed(6)
    model = DeconvHead().eval()
    assert choose_layers(model, (3, 8, 8), share=1.0) == ["deconv", "conv"]  # the 1x1 head is skipped
    new, rec = factorize(model, (3, 8, 8), method="bottleneck", rank=27)  # >= min(O*k2, I) for both
    assert rec.rank == 27 and rec.macs_reduction is None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() < 1e-5
    assert all(lay.weight_rel_error < 1e-6 for lay in rec.layers)
    new, rec = factorize(model, (3, 8, 8), layers=["deconv"], method="bottleneck", macs_reduction=0.5)
    assert rec.layers[0].op == "ConvTranspose2d" and rec.layers[0].macs_after <= 0.5 * rec.layers[0].macs_before


def test_errors_are_one_line_and_name_the_fix():
    c1x1, grouped, dw = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=8)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    cases = [
        (lambda: depthwise_separable(c1x1), "1x1"),
        (lambda: bottleneck(c1x1, 2), "1x1"),
        (lambda: depthwise_separable(grouped), "grouped"),
        (lambda: bottleneck(dw, 2), "grouped"),
        (lambda: bottleneck(conv, 0), "positive integer"),
        (lambda: depthwise_separable(conv, -1), "positive integer"),
        (lambda: bottleneck(conv, 1.5), "positive integer"),
        (lambda: depthwise_separable(nn.ConvTranspose2d(4, 4, 3)), "bottleneck"),
        (lambda: bottleneck(nn.Linear(4, 4), 2), "Linear"),
        (lambda: rank_for(conv, (8, 8), method="separable", macs_reduction=0.05), "raise macs_reduction"),
        (lambda: factorize(resnet20(), (3, 32, 32), method="svd"), "unknown factorization method"),
        (lambda: factorize(resnet20(), (3, 32, 32), layers=["layer9.conv"]), "not a conv"),
        (lambda: factorize(resnet20(), (3, 32, 32), rank=0), "positive integer"),
        (lambda: choose_layers(resnet20(), (3, 32, 32), share=0.0), "share"),
    ]
    cases += [(lambda f=f: factorize(resnet20(), (3, 32, 32), macs_reduction=f), "(0, 1)")
              for f in (0.0, 1.0, 1.5, -0.1)]
    for call, needle in cases:
        with pytest.raises(EdgeslimError) as info:
            call()
        assert needle in str(info.value) and "\n" not in str(info.value)
