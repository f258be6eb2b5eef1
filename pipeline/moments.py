"""Streaming per-voxel mean and covariance of vector samples, with a nested (group) variance split.

Samples arrive in batches ``x`` of shape ``(n, C, *spatial)`` with a validity weight ``(n, *spatial)``
(0 or 1) and a group index per sample. Groups are sets of draws that share one perturbation; a group is
always whole inside one batch. Each sample is centred on a per-voxel reference (the first sample seen) and
three running sums are kept, in place, in the accumulator's dtype (float32 by default):

    S1 = sum w d,    S2 = sum w d d^T,    G = sum over groups of s_g s_g^T / n_g     (d = x - reference)

with ``s_g``, ``n_g`` a group's sum and count. One pass over the samples then gives what a two-pass
computation gives. Centring is what makes float32 enough: the sums hold deviations of a few voxels, not
positions of ~100 (a 0.05 mm spread at 150 mm survives; ``tests/test_moments.py``). Sums of squares split
by the law of total variance:

    SS_total = S2 - S1 S1^T / n = SS_within (S2 - G) + SS_between (G - S1 S1^T / n)

Per voxel, with ``n`` valid samples in ``g`` groups:

* total covariance ``= SS_total / (n - 1)``;
* within ("intrinsic spread") ``= SS_within / (n - g)``, the unbiased estimate of the mean within-group
  covariance (the classical variance-components estimator);
* between ("bias jitter") ``= total - within``. It estimates the covariance of the group means *without*
  the ``Sigma / draws`` that finite draws add to them, so it is unbiased too, and the two terms add up to
  the total exactly. Being a difference, it can be slightly negative where the true jitter is ~0.

Symmetric components are stored in the order given by :func:`components` (diagonal first, then the
upper triangle row by row); an accumulator may keep a subset of them (e.g. the diagonal only, when only
the trace is wanted and the axes are orthogonal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def components(c: int) -> tuple[tuple[int, int], ...]:
    """Index pairs of the stored symmetric components: ``(0,0), (1,1), ..., (0,1), (0,2), ..., (1,2) ...``."""
    diag = tuple((i, i) for i in range(c))
    upper = tuple((i, j) for i in range(c) for j in range(i + 1, c))
    return diag + upper


class StreamingMoments:
    """Running count, centred sums and group sums of ``C``-vector samples on a grid (see module doc).

    ``comps``: the covariance components to keep (default: all of :func:`components`); ``dtype`` of the
    sums: float32 by default (samples are centred), float64 for reference computations.
    """

    def __init__(self, channels: int, spatial: tuple[int, ...], device, dtype: torch.dtype = torch.float32,
                 comps: Sequence[tuple[int, int]] | None = None):
        self.comps = tuple(comps) if comps is not None else components(channels)
        unknown = set(self.comps) - set(components(channels))
        if unknown:
            raise ValueError(f"components {sorted(unknown)} are not upper-triangle pairs of {channels} channels")
        self.dtype = dtype
        zeros = lambda *s: torch.zeros(*s, *spatial, dtype=dtype, device=device)  # noqa: E731
        self.count = zeros()
        self.groups = zeros()  # groups with >= 1 valid sample
        self.s1 = zeros(channels)
        self.s2 = zeros(len(self.comps))
        self.g = zeros(len(self.comps))  # sum of s_g s_g^T / n_g; equals s2 while every group is one draw
        self.split = False  # whether any group had more than one draw
        self.reference: Tensor | None = None  # per-voxel centre of the samples (the first sample)

    def update(self, x: Tensor, weight: Tensor, group: Tensor) -> None:
        """Add samples ``x`` ``(n, C, *spatial)`` with 0/1 ``weight`` ``(n, *spatial)`` and ``group`` ids ``(n,)``
        (``0 .. g-1`` within the batch; a group is whole inside one batch)."""
        if self.reference is None:
            self.reference = x[0].detach().to(self.dtype).clone()
        w = weight.to(self.dtype)
        group = group.to(x.device)
        n_groups = int(group.max()) + 1
        if n_groups < x.shape[0] and not self.split:  # from now on G differs from S2 (it starts equal to it)
            self.split = True
            self.g.copy_(self.s2)
            self.groups.copy_(self.count)
        d = torch.empty_like(self.s1)
        for k in range(x.shape[0]):  # one sample at a time, in place: no (n, C, *spatial) temporaries
            torch.sub(x[k], self.reference, out=d)
            d.mul_(w[k])  # w is 0/1, so products of weighted deviations carry w once
            self.count.add_(w[k])
            self.s1.add_(d)
            for c, (i, j) in enumerate(self.comps):
                self.s2[c].addcmul_(d[i], d[j])
                if self.split and n_groups == x.shape[0]:  # a one-draw group: s_g s_g^T / n_g = w d d^T
                    self.g[c].addcmul_(d[i], d[j])
        if n_groups == x.shape[0]:
            if self.split:
                self.groups.add_((w > 0).sum(0))
            return
        n_g = torch.zeros(n_groups, *w.shape[1:], dtype=self.dtype, device=x.device).index_add_(0, group, w)
        d = (x.to(self.dtype) - self.reference) * w[:, None]
        s_g = torch.zeros(n_groups, *d.shape[1:], dtype=self.dtype, device=x.device).index_add_(0, group, d)
        self.groups += (n_g > 0).sum(0)
        inv = 1 / n_g.clamp_min(1)
        for c, (i, j) in enumerate(self.comps):
            self.g[c] += (s_g[:, i] * s_g[:, j] * inv).sum(0)

    def groups_seen(self) -> Tensor:
        """Groups with at least one valid sample, per voxel (the count itself while every group is one draw)."""
        return self.groups if self.split else self.count

    def mean_value(self) -> Tensor:
        """The per-voxel mean ``(C, *spatial)``, in the units of the samples (0 where no sample is valid)."""
        if self.reference is None:
            return self.s1
        return self.reference + self.s1 / self.count.clamp_min(1)

    def _squares(self, which: str) -> Tensor:
        """Sums of squares about the mean: total, within or between, ``(n_comp, *spatial)``."""
        g = self.g if self.split else self.s2
        if which == "within":
            return self.s2 - g
        outer = torch.stack([self.s1[i] * self.s1[j] for i, j in self.comps]) / self.count.clamp_min(1)
        return (self.s2 if which == "total" else g) - outer

    def covariance(self, which: str = "total") -> Tensor:
        """Covariance components ``(n_comp, *spatial)``: ``total``, ``within`` or ``between`` (see module doc).

        NaN where fewer than two samples are valid (``total``) or no group has two valid draws (split).
        """
        if which not in ("total", "within", "between"):
            raise ValueError(f"unknown covariance term {which!r}")
        nan = float("nan")
        total = torch.where(self.count >= 2, self._squares("total") / (self.count - 1).clamp_min(1), nan)
        if which == "total":
            return total
        dof = self.count - self.groups_seen()
        within = torch.where(dof >= 1, self._squares("within") / dof.clamp_min(1), nan)
        return within if which == "within" else total - within


def trace(cov: Tensor, channels: int) -> Tensor:
    """Trace of a covariance stored as components (sum of the first ``channels`` diagonal entries)."""
    return cov[:channels].sum(0)


def transform(cov: Tensor, comps: Sequence[tuple[int, int]], linear: Tensor) -> Tensor:
    """All components of ``L C L^T`` from a symmetric ``C`` stored as all of its components ``comps``.

    ``cov``: ``(n_comp, *spatial)``; ``linear``: ``L`` ``(C, C)``, e.g. the linear part of a voxel-to-world
    affine (voxel units -> mm). Returns the components in the same order.
    """
    lin = linear.to(dtype=cov.dtype, device=cov.device)
    rows = []
    for i, j in comps:
        acc = torch.zeros_like(cov[0])
        for k, (a, b) in enumerate(comps):
            coef = float(lin[i, a] * lin[j, b] + (lin[i, b] * lin[j, a] if a != b else 0))
            if coef != 0:
                acc += coef * cov[k]
        rows.append(acc)
    return torch.stack(rows)


def trace_weights(linear: Tensor, rtol: float = 1e-9) -> dict[tuple[int, int], float]:
    """``trace(L C L^T) = sum of w_ab C_ab`` over the components with a weight: ``w = (L^T L)_ab``, doubled off
    the diagonal (both triangles). Weights below ``rtol`` of the largest are dropped, so an axis-aligned grid
    (any voxel sizes, axes permuted or flipped) needs only the diagonal of ``C``."""
    m = (linear.T @ linear).double()
    scale = float(m.abs().max())
    weights = {}
    for a, b in components(linear.shape[0]):
        w = float(m[a, b]) * (1 if a == b else 2)
        if abs(w) > rtol * scale:
            weights[(a, b)] = w
    return weights
