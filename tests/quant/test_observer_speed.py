"""The one-pass observer range (``observers.finite_min_max`` / ``all_finite``) against numpy: the same min / max
bit for bit and the same NaN / inf refusals as ``isfinite(x).all()`` followed by a min and a max."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeslim.errors import EdgeslimError
from edgeslim.quant.observers import MinMaxObserver, all_finite, finite_min_max


def _tensors():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(2, 3, 5, 7, generator=g)
    yield torch.relu(torch.randn(4, 8, 9, 9, generator=g))  # half of it exact zeros
    yield torch.randn(3, 16, 33, 31, generator=g) * 1e4
    yield torch.full((2, 2, 3, 3), -2.5)
    yield torch.randn(1, 5, generator=g)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_min_max_equals_numpy(axis):
    for x in _tensors():
        a = x.numpy()
        lo, hi = finite_min_max(x, axis)
        if axis is None:
            want_lo, want_hi = a.min(), a.max()
        else:
            flat = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
            want_lo, want_hi = flat.min(axis=1), flat.max(axis=1)
        np.testing.assert_array_equal(lo.numpy(), want_lo)
        np.testing.assert_array_equal(hi.numpy(), want_hi)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_wherever_it_is(axis, bad):
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    for pos in [(0, 0, 0, 0), (1, 3, 4, 5), (0, 2, 1, 3), (1, 0, 4, 0)]:
        y = x.clone()
        y[pos] = bad
        assert not np.isfinite(y.numpy()).all()
        with pytest.raises(EdgeslimError, match="NaN/inf activations"):
            finite_min_max(y, axis)
        with pytest.raises(EdgeslimError, match="NaN/inf activations"):
            MinMaxObserver(axis).observe(y)
        assert all_finite(y) is False


def test_all_finite_matches_isfinite():
    cases = [*_tensors(), torch.zeros(0, 3), torch.arange(6), torch.randn(5).half(),
             torch.tensor([1.0, float("nan")]).half(), torch.tensor([float("inf")]), torch.tensor(3.0)]
    for x in cases:
        assert all_finite(x) is bool(torch.isfinite(x).all())


def test_observer_running_range_equals_numpy():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 6, 8, 8, generator=g) * s for s in (0.5, 2.0, 1.0)]
    for axis in (None, 1):
        obs = MinMaxObserver(axis)
        for b in batches:
            out = obs.observe(b)
            assert torch.equal(out, b)
        a = np.concatenate([b.numpy() for b in batches])
        red = None if axis is None else (0, 2, 3)
        np.testing.assert_array_equal(obs.min_val.numpy(), a.min(axis=red))
        np.testing.assert_array_equal(obs.max_val.numpy(), a.max(axis=red))
