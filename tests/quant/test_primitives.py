import math

import pytest
import torch

from edgeslim.errors import EdgeslimError
from edgeslim.quant import primitives as P


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch_fake_quant(bits, signed, symmetric):
    x = torch.randn(4096) * 3 + (0.0 if signed else 2.0)
    scale, zp = P.choose_qparams(x.min(), x.max(), bits, symmetric=symmetric, signed=signed)
    qmin, qmax = P.qrange(bits, signed)
    ours = P.dequantize(P.quantize(x, scale, zp, qmin, qmax), scale, zp)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    assert torch.equal(ours, ref)
    assert torch.equal(P.fake_quantize(x, scale, zp, qmin, qmax), ref)


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_torch_fake_quant(bits, symmetric):
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2.0, 6).reshape(-1, 1, 1, 1)
    flat = w.reshape(6, -1)
    scale, zp = P.choose_qparams(flat.min(1).values, flat.max(1).values, bits, symmetric=symmetric, signed=True)
    qmin, qmax = P.qrange(bits, True)
    ours = P.dequantize(P.quantize(w, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, qmin, qmax)
    assert torch.equal(ours, ref)


def test_ties_round_half_to_even():
    scale, zp = torch.tensor(1.0), torch.tensor(0)
    q = P.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), scale, zp, -128, 127)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_symmetric_scale_is_seed001_formula():
    scale, zp = P.choose_qparams(torch.tensor(-3.0), torch.tensor(2.0), 8, symmetric=True, signed=True)
    assert math.isclose(float(scale), 3.0 / 127, rel_tol=1e-6) and int(zp) == 0


def test_asymmetric_range_includes_zero_exactly():
    scale, zp = P.choose_qparams(torch.tensor(0.5), torch.tensor(4.0), 8, symmetric=False, signed=False)
    assert int(zp) == 0  # min widened to 0, so real 0 (zero padding, ReLU) is exact
    assert float(P.fake_quantize(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0


def test_pow2_scales_are_powers_of_two_and_cover_range():
    lo, hi = torch.tensor([-1.0, -0.3]), torch.tensor([0.7, 5.0])
    scale, _ = P.choose_qparams(lo, hi, 8, symmetric=True, signed=True, pow2=True)
    log2 = torch.log2(scale)
    assert torch.equal(log2, torch.round(log2))
    assert torch.all(scale * 127 >= torch.maximum(lo.abs(), hi.abs()))


@pytest.mark.parametrize("bits", [1, 17, 8.0])
def test_invalid_bits(bits):
    with pytest.raises(EdgeslimError, match="bits"):
        P.qrange(bits, True)


@pytest.mark.parametrize("real", [1e-6, 0.0123, 0.5, 0.999999, 1.0, 3.75])
def test_quantize_multiplier_represents_real(real):
    m0, shift = P.quantize_multiplier(real)
    assert 2**30 <= m0 < 2**31
    assert math.isclose(m0 * 2.0**-shift, real, rel_tol=2**-30)


def test_quantize_multiplier_pow2_is_pure_shift():
    assert P.quantize_multiplier(2.0**-7) == (2**30, 37)


def test_bias_quantization_int32():
    b = torch.tensor([0.1, -0.25])
    q = P.quantize_bias(b, torch.tensor(0.01), torch.tensor([0.5, 0.1]))
    assert q.tolist() == [20, -250]


def test_nan_range_rejected():
    with pytest.raises(EdgeslimError, match="NaN"):
        P.choose_qparams(torch.tensor(float("nan")), torch.tensor(1.0), 8, symmetric=True, signed=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # compares signed zeros too


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (-128, 127), (0, 15), (-8, 7), (-32768, 32767), (0, 1)])
def test_no_grad_fake_quant_is_torchs_kernel_bit_for_bit(qmin, qmax):
    """Inference fake-quant (``fake_quantize`` without gradients: vectorized passes) equals torch's own kernel on
    every float32 bit pattern class: exact ties at half steps, both signed zeros, tiny and huge values, values
    far outside the grid, for many scales and zero points."""
    g = torch.Generator().manual_seed(qmax - qmin)
    for _ in range(40):
        scale = torch.exp(torch.empty(()).uniform_(-12.0, 6.0, generator=g)).to(torch.float32)
        zp = int(torch.randint(qmin, qmax + 1, (), generator=g))
        steps = torch.randint(qmin - zp - 3, qmax - zp + 4, (2000,), generator=g).to(torch.float32)
        x = torch.cat([
            (steps + 0.5) * scale, (steps - 0.5) * scale, steps * scale,           # ties and grid points
            torch.randn(2000, generator=g) * scale * (qmax - qmin),                  # the usual spread
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 1e20, -1e20]),      # zeros, tiny and huge
            torch.randint(-2**31, 2**31 - 1, (2000,), generator=g).view(torch.float32),  # any bit pattern ...
        ])
        x = x[torch.isfinite(x)]                                                     # ... that is finite
        ref = torch.fake_quantize_per_tensor_affine(x, float(scale), zp, qmin, qmax)
        with torch.no_grad():
            ours = P.fake_quantize(x, scale, torch.tensor(zp), qmin, qmax)
        assert torch.equal(_bits(ours), _bits(ref)), (float(scale), zp)


def test_fake_quant_with_gradients_stays_torchs_straight_through_kernel():
    x = (torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
    scale, zp = torch.tensor(0.05), torch.tensor(3)
    y = P.fake_quantize(x, scale, zp, 0, 255)
    y.sum().backward()
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), 0.05, 3, 0, 255)
    assert torch.equal(y.detach(), ref)
    inside = ((x.detach() / 0.05).round() + 3 >= 0) & ((x.detach() / 0.05).round() + 3 <= 255)
    assert torch.equal(x.grad, inside.float())
