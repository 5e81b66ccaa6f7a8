import numpy as np
import pytest
import torch

from edgeslim.errors import EdgeslimError
from edgeslim.quant import primitives as P
from edgeslim.quant.observers import HIST_BINS, OBSERVERS, MinMaxObserver, mse_weight_range


def _observe(obs, chunks):
    for c in chunks:
        obs.observe(c)
    if obs.needs_histogram:
        for c in chunks:
            obs.observe_histogram(c)
    return obs


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=g)
    x[:2] = 25.0  # rare outliers
    return list(x.chunk(4))


def test_minmax_per_channel_matches_numpy():
    x = torch.randn(8, 5, 4, 4)
    obs = MinMaxObserver(axis=1)
    obs.observe(x[:4]), obs.observe(x[4:])
    ref = x.numpy().transpose(1, 0, 2, 3).reshape(5, -1)
    lo, hi = obs.real_range(8, True)
    assert np.array_equal(lo.numpy(), ref.min(1)) and np.array_equal(hi.numpy(), ref.max(1))


def test_percentile_matches_numpy_within_one_bin():
    chunks = _data()
    lo, hi = _observe(OBSERVERS["percentile"](), chunks).real_range(8, True)
    x = torch.cat(chunks).numpy()
    ref = np.percentile(np.abs(x), 99.99)
    bin_width = (x.max() - x.min()) / HIST_BINS
    assert abs(float(hi) - ref) <= 2 * bin_width and float(lo) == max(-float(hi), float(x.min()))


@pytest.mark.parametrize("name", ["entropy", "mse", "percentile"])
def test_clipping_calibrators_beat_minmax_with_outliers(name):
    chunks = _data()
    x = torch.cat(chunks)

    def error(lo, hi):  # 4-bit, where clipping rare outliers pays off
        s, z = P.choose_qparams(lo, hi, 4, symmetric=True, signed=True)
        return float((P.fake_quantize(x, s, z, -8, 7) - x).pow(2).mean())

    clipped = _observe(OBSERVERS[name](), chunks).real_range(4, True)
    full = _observe(OBSERVERS["minmax"](), chunks).real_range(4, True)
    assert float(clipped[1]) < float(full[1])
    assert error(*clipped) < error(*full)


def test_mse_weight_range_never_worse_than_minmax():
    w = torch.randn(16, 8, 3, 3)
    w[0, 0, 0, 0] = 8.0
    flat = w.reshape(16, -1)
    lo, hi = mse_weight_range(w, 4, 0, True)

    def err(lo, hi):
        s, z = P.choose_qparams(lo, hi, 4, symmetric=True, signed=True)
        return (P.fake_quantize(flat, s, z, -8, 7, axis=0) - flat).pow(2).sum(1)

    assert torch.all(err(lo, hi) <= err(flat.min(1).values, flat.max(1).values) + 1e-9)


def test_nan_activation_is_a_clear_error():
    with pytest.raises(EdgeslimError, match="NaN/inf"):
        MinMaxObserver().observe(torch.tensor([1.0, float("nan")]))


def test_unobserved_quantizer_is_a_clear_error():
    with pytest.raises(EdgeslimError, match="no data"):
        MinMaxObserver().real_range(8, True)
