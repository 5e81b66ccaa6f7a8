"""Cross-layer equalization: the function is unchanged, ranges are balanced, per-tensor low-bit error drops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import api
from edgeslim.algorithms.cle import equalizable_pairs, equalize
from edgeslim.config import PTQConfig
from edgeslim.errors import EdgeslimError
from edgeslim.graph.capture import capture
from edgeslim.graph.passes import fold_bn, fuse_conv_act
from edgeslim.quant.primitives import sqnr_db


def _imbalanced() -> nn.Module:
    """Conv-ReLU-Conv-ReLU-Conv whose middle channels span 100x in range (the same function as a balanced net)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    scale = torch.logspace(-1, 1, 8)
    with torch.no_grad():
        m[0].weight.mul_(scale.reshape(-1, 1, 1, 1))
        m[0].bias.mul_(scale)
        m[2].weight.div_(scale.reshape(1, -1, 1, 1))
    return m.eval()


def _folded(model):
    return fuse_conv_act(fold_bn(capture(model, (3, 8, 8))))


def test_equalization_keeps_the_function_and_balances_ranges(tiny_model):
    for model, shape in ((_imbalanced(), (3, 8, 8)), (tiny_model, (3, 16, 16))):
        gm = fuse_conv_act(fold_bn(capture(model, shape)))
        x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            before = gm(x)
            equalize(gm, iterations=1)
            after = gm(x)
        np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-4, atol=1e-5)
    gm = equalize(_folded(_imbalanced()), iterations=1)
    gm.requires_grad_(False)
    pairs = equalizable_pairs(gm)
    assert pairs == [("0", "2"), ("2", "4")]
    c2, c3 = gm.get_submodule("2").conv, gm.get_submodule("4")
    r2 = c2.weight.abs().reshape(8, -1).amax(1)
    r3 = c3.weight.abs().transpose(0, 1).reshape(8, -1).amax(1)
    assert torch.allclose(r2, r3, rtol=1e-5)  # the last pair of a sweep is exactly balanced
    r1 = gm.get_submodule("0").conv.weight.abs().reshape(8, -1).amax(1)
    assert float(r1.max() / r1.min()) < 2.0  # was 100x before equalization


def test_residual_inputs_are_not_equalized(tiny_model):
    # tiny_model's c1 output feeds c2 *and* the residual add: rescaling it would change the add
    assert equalizable_pairs(_folded_tiny(tiny_model)) == []


def _folded_tiny(model):
    return fuse_conv_act(fold_bn(capture(model, (3, 16, 16))))


def test_cle_lowers_per_tensor_low_bit_error():
    model = _imbalanced()
    calib = torch.rand(64, 3, 8, 8)
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    scores = {}
    for algos in ((), ("cle",)):
        q = api.quantize(model, calib, PTQConfig(w_bits=4, a_bits=8, granularity="tensor", algorithms=algos))
        with torch.no_grad():
            scores[algos] = sqnr_db(ref, q.model(x))
    assert scores[("cle",)] > scores[()] + 3.0  # dB


def test_cle_config_validation():
    assert PTQConfig.from_dict(PTQConfig(algorithms=("cle",)).to_dict()).algorithms == ("cle",)
    with pytest.raises(EdgeslimError, match="--algorithm"):
        PTQConfig(algorithms=("gptq",))
    with pytest.raises(EdgeslimError, match="no-fuse"):
        PTQConfig(algorithms=("cle",), fuse=False)


def test_bias_correction_removes_the_mean_shift_of_each_layer(tiny_model, tiny_calib):
    from edgeslim.algorithms import ptq
    from edgeslim.algorithms.bias_correction import _channel_means, correct_bias

    config = PTQConfig(w_bits=2, a_bits=8, granularity="tensor")
    gm = ptq.prepare(tiny_model, (3, 16, 16), config)
    calib = tiny_calib.abs() + 0.5  # inputs with a non-zero mean: weight errors then shift the output means
    batches = lambda: [calib]  # noqa: E731
    ptq.calibrate(gm, batches)
    ptq.freeze(gm, config)
    mods = [ptq.ops.module(gm, n) for n in ptq.weighted_nodes(gm)]

    def shifts():
        ptq.set_mode(gm, "off")
        f = _channel_means(gm, mods, batches)
        ptq.set_mode(gm, "quant")
        return [float((a - b).abs().max()) for a, b in zip(f, _channel_means(gm, mods, batches))]

    before = shifts()
    removed = correct_bias(gm, batches)
    after = shifts()
    assert list(removed.values())[0] == pytest.approx(before[0])
    first = mods[0]
    bias_lsb = float((first.input_scale * first.w_scale).max())  # the int32 bias grid limits the correction
    assert before[0] > 10 * bias_lsb and after[0] <= bias_lsb + 1e-6  # input unchanged: exact up to bias rounding
    assert sum(after) < 0.5 * sum(before)
    q = api.quantize(tiny_model, tiny_calib, PTQConfig(w_bits=3, algorithms=("bias-correction",)))
    assert q.config.algorithms == ("bias-correction",)
