"""Streaming moments equal a two-pass computation, whatever the batching; the split adds up."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.moments import StreamingMoments, components


def two_pass(x: np.ndarray, w: np.ndarray, groups: np.ndarray):
    """Reference: per voxel, covariance over valid samples (divisor n - 1) and the within/between split."""
    n_s, c = x.shape[:2]
    comps = components(c)
    n = w.sum(0)
    mean = (x * w[:, None]).sum(0) / np.maximum(n, 1)
    total = np.stack([((x[:, i] - mean[i]) * (x[:, j] - mean[j]) * w).sum(0) for i, j in comps])
    within = np.zeros_like(total)
    seen = np.zeros_like(n)
    for g in np.unique(groups):
        sel = groups == g
        ng = w[sel].sum(0)
        mg = (x[sel] * w[sel][:, None]).sum(0) / np.maximum(ng, 1)
        seen += ng > 0
        within += np.stack([((x[sel][:, i] - mg[i]) * (x[sel][:, j] - mg[j]) * w[sel]).sum(0) for i, j in comps])
    total = total / np.where(n >= 2, n - 1, np.nan)
    within = within / np.where(n - seen >= 1, n - seen, np.nan)
    return n, mean, total, within, total - within


@given(seed=st.integers(0, 2**31 - 1), draws=st.integers(1, 3), split=st.integers(1, 4),
       c=st.sampled_from([2, 3]))
@settings(max_examples=30, deadline=None)
def test_streaming_equals_two_pass(seed, draws, split, c):
    rng = np.random.default_rng(seed)
    n_groups, spatial = 7, (3, 4)
    x = rng.normal(50.0, 2.0, (n_groups * draws, c, *spatial))  # offset like mm positions
    w = (rng.random((n_groups * draws, *spatial)) > 0.2).astype(float)
    groups = np.repeat(np.arange(n_groups), draws)
    acc = StreamingMoments(c, spatial, "cpu")
    bounds = np.unique(np.r_[0, np.sort(rng.integers(1, n_groups, split - 1)), n_groups])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = slice(lo * draws, hi * draws)
        g = torch.as_tensor(groups[sel] - lo)
        acc.update(torch.as_tensor(x[sel]), torch.as_tensor(w[sel]), g)
    n, mean, total, within, between = two_pass(x, w, groups)
    np.testing.assert_allclose(acc.count.numpy(), n)
    ok = n > 0
    np.testing.assert_allclose(acc.mean.numpy()[:, ok], mean[:, ok], rtol=0, atol=1e-9)
    np.testing.assert_allclose(acc.covariance("total").numpy(), total, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.covariance("within").numpy(), within, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.covariance("between").numpy(), between, rtol=1e-9, atol=1e-9)
    split_sum = acc.covariance("within").numpy() + acc.covariance("between").numpy()
    has_split = np.isfinite(split_sum)
    np.testing.assert_allclose(split_sum[has_split], acc.covariance("total").numpy()[has_split], rtol=1e-12,
                               atol=1e-12)
    if draws == 1:
        assert np.isnan(acc.covariance("within").numpy()).all()


def test_components_order():
    assert components(3) == ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    assert components(2) == ((0, 0), (1, 1), (0, 1))
