"""Streaming moments equal a two-pass computation, whatever the batching; the split adds up."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equiqc.pipeline.moments import StreamingMoments, components, trace_weights, transform


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
    acc = StreamingMoments(c, spatial, "cpu", dtype=torch.float64)
    bounds = np.unique(np.r_[0, np.sort(rng.integers(1, n_groups, split - 1)), n_groups])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = slice(lo * draws, hi * draws)
        g = torch.as_tensor(groups[sel] - lo)
        acc.update(torch.as_tensor(x[sel]), torch.as_tensor(w[sel]), g)
    n, mean, total, within, between = two_pass(x, w, groups)
    np.testing.assert_allclose(acc.count.numpy(), n)
    ok = n > 0
    np.testing.assert_allclose(acc.mean_value().numpy()[:, ok], mean[:, ok], rtol=0, atol=1e-9)
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


def test_float32_samples_far_from_the_origin_keep_small_spreads():
    # Positions ~150 mm with a 0.05 mm spread: naive float32 sums of squares would lose the spread;
    # centring on a per-voxel reference keeps it to float32 precision of the deviations.
    rng = np.random.default_rng(3)
    x = 150.0 + rng.normal(0.0, 0.05, (16, 3, 4, 5))
    w = np.ones((16, 4, 5))
    results = {}
    for dtype in (torch.float64, torch.float32):
        acc = StreamingMoments(3, (4, 5), "cpu", dtype=dtype)
        for lo in range(0, 16, 4):
            acc.update(torch.as_tensor(x[lo:lo + 4]).to(dtype), torch.as_tensor(w[lo:lo + 4]), torch.arange(4))
        results[dtype] = acc
    ref = two_pass(x, w, np.arange(16))[2]
    # (off-diagonal terms ~1e-5 mm^2: compare them on the scale of the variances, 2.5e-3 mm^2)
    np.testing.assert_allclose(results[torch.float32].covariance().numpy(), ref, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(results[torch.float32].mean_value().numpy(), x.mean(0), rtol=0, atol=1e-4)


@given(seed=st.integers(0, 2**31 - 1), draws=st.integers(1, 3), split=st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_float32_sums_match_a_two_pass_float64_reference(seed, draws, split):
    # The estimator's setting: float32 sums of voxel coordinates ~100 with spreads of ~0.05-3 voxels.
    rng = np.random.default_rng(seed)
    n_groups, spatial = 9, (4, 3, 2)
    spread = rng.uniform(0.05, 3.0, spatial)
    x = 100.0 + rng.normal(0.0, 1.0, (n_groups * draws, 3, *spatial)) * spread
    w = (rng.random((n_groups * draws, *spatial)) > 0.1).astype(float)
    groups = np.repeat(np.arange(n_groups), draws)
    acc = StreamingMoments(3, spatial, "cpu")  # float32, the estimator's default
    bounds = np.unique(np.r_[0, np.sort(rng.integers(1, n_groups, split - 1)), n_groups])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = slice(lo * draws, hi * draws)
        acc.update(torch.as_tensor(x[sel], dtype=torch.float32), torch.as_tensor(w[sel] > 0),
                   torch.as_tensor(groups[sel] - lo))
    n, mean, total, within, _ = two_pass(x, w, groups)
    scale = spread**2  # compare on the scale of the variances
    ok = n >= 2
    np.testing.assert_allclose(acc.covariance("total").numpy()[:, ok] / scale[ok], total[:, ok] / scale[ok],
                               rtol=0, atol=2e-4)
    np.testing.assert_allclose(acc.mean_value().numpy()[:, ok], mean[:, ok], rtol=0, atol=1e-4)
    if draws > 1:
        has = np.isfinite(within)
        np.testing.assert_allclose(acc.covariance("within").numpy()[has] / np.broadcast_to(scale, within.shape)[has],
                                   within[has] / np.broadcast_to(scale, within.shape)[has], rtol=0, atol=2e-4)


def test_a_subset_of_components_gives_the_same_values():
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(0, 1, (6, 3, 5)), dtype=torch.float32)
    w = torch.ones(6, 5)
    every = StreamingMoments(3, (5,), "cpu")
    diag = StreamingMoments(3, (5,), "cpu", comps=((0, 0), (1, 1), (2, 2)))
    for acc in (every, diag):
        acc.update(x, w, torch.arange(6))
    np.testing.assert_array_equal(diag.covariance().numpy(), every.covariance().numpy()[:3])


def test_transform_and_trace_weights_follow_the_affine():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 3))
    cov_full = a @ a.T
    comps = components(3)
    cov = torch.tensor([[cov_full[i, j]] for i, j in comps])
    linear = torch.tensor([[0.0, 2.0, 0.1], [-1.5, 0.0, 0.0], [0.3, 0.0, 1.0]], dtype=torch.float64)
    expected = linear.numpy() @ cov_full @ linear.numpy().T
    out = transform(cov, comps, linear).numpy()[:, 0]
    np.testing.assert_allclose(out, [expected[i, j] for i, j in comps], rtol=1e-12)
    weights = trace_weights(linear)
    np.testing.assert_allclose(sum(w * cov_full[i, j] for (i, j), w in weights.items()), np.trace(expected))
    # an axis-aligned grid (voxel sizes, a permutation, flips) needs only the diagonal
    aligned = torch.tensor([[0.0, -2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    assert set(trace_weights(aligned)) == {(0, 0), (1, 1), (2, 2)}
