"""Streaming per-voxel mean and covariance of vector samples, with a nested (group) variance split.

Samples arrive in batches ``x`` of shape ``(n, C, *spatial)`` with a validity weight ``(n, *spatial)``
(0 or 1) and a group index per sample. Groups are sets of draws that share one perturbation; a group is
always whole inside one batch. Batches are merged with Chan et al.'s pairwise update, so one pass over
the samples gives exactly what a two-pass computation gives, in memory independent of the number of
samples. Sums of squares are split by the law of total variance:

    SS_total = SS_within (draws around their group mean) + SS_between (group means around the grand mean)

Per voxel, with ``n`` valid samples in ``g`` groups:

* total covariance ``= SS_total / (n - 1)``;
* within ("intrinsic spread") ``= SS_within / (n - g)``, the unbiased estimate of the mean within-group
  covariance (the classical variance-components estimator);
* between ("bias jitter") ``= total - within``. It estimates the covariance of the group means *without*
  the ``Sigma / draws`` that finite draws add to them, so it is unbiased too, and the two terms add up to
  the total exactly. Being a difference, it can be slightly negative where the true jitter is ~0.

Symmetric components are stored in the order given by :func:`components` (diagonal first, then the
upper triangle row by row).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def components(c: int) -> tuple[tuple[int, int], ...]:
    """Index pairs of the stored symmetric components: ``(0,0), (1,1), ..., (0,1), (0,2), ..., (1,2) ...``."""
    diag = tuple((i, i) for i in range(c))
    upper = tuple((i, j) for i in range(c) for j in range(i + 1, c))
    return diag + upper


class StreamingMoments:
    """Running count, mean and split sums of squares for ``C``-vector samples on a grid.

    Accumulators are kept in ``dtype`` (float64 by default: sums of squares of coordinates in mm lose
    precision in float32 once the spread is well below a millimetre at positions of ~100 mm).
    """

    def __init__(self, channels: int, spatial: tuple[int, ...], device, dtype: torch.dtype = torch.float64):
        self.comps = components(channels)
        self.count = torch.zeros(spatial, dtype=dtype, device=device)
        self.mean = torch.zeros(channels, *spatial, dtype=dtype, device=device)
        self.within = torch.zeros(len(self.comps), *spatial, dtype=dtype, device=device)
        self.between = torch.zeros(len(self.comps), *spatial, dtype=dtype, device=device)
        self.groups = torch.zeros(spatial, dtype=dtype, device=device)  # groups with >= 1 valid sample
        self.reference: Tensor | None = None  # per-voxel centre of the samples (the first sample)
        self.dtype = dtype

    def update(self, x: Tensor, weight: Tensor, group: Tensor) -> None:
        """Add samples ``x`` ``(n, C, *spatial)`` with 0/1 ``weight`` ``(n, *spatial)`` and ``group`` ids ``(n,)``.

        The batch's own sums are computed in ``x``'s dtype on samples centred on a per-voxel reference (the
        first sample seen), so float32 input loses nothing that matters (deviations of a few mm, not
        positions of ~100 mm); merging into the running accumulators happens in their float64.
        """
        if self.reference is None:
            self.reference = x[0].detach().clone()
        x = x - self.reference
        work = x.dtype
        w = weight.to(work)
        group = group.to(x.device)
        g = int(group.max()) + 1
        if g == x.shape[0]:  # one draw per group: within-group sums of squares are zero
            n_g, m_g = w, x
        else:
            n_g = torch.zeros(g, *w.shape[1:], dtype=work, device=x.device).index_add_(0, group, w)
            s_g = torch.zeros(g, *x.shape[1:], dtype=work, device=x.device).index_add_(0, group, x * w[:, None])
            m_g = s_g / n_g.clamp_min(1)[:, None]
            dev = (x - m_g[group]) * w[:, None]
            for c, (i, j) in enumerate(self.comps):
                self.within[c] += (dev[:, i] * dev[:, j]).sum(0).to(self.dtype)
            del dev, s_g
        n_b = n_g.sum(0)
        self.groups += (n_g > 0).sum(0).to(self.dtype)
        m_b = (m_g * n_g[:, None]).sum(0) / n_b.clamp_min(1)
        dg = (m_g - m_b) * (n_g > 0)[:, None]
        n_b, m_b = n_b.to(self.dtype), m_b.to(self.dtype)
        delta = m_b - self.mean
        n_new = self.count + n_b
        f = self.count * n_b / n_new.clamp_min(1)
        for c, (i, j) in enumerate(self.comps):
            self.between[c] += (n_g * dg[:, i] * dg[:, j]).sum(0).to(self.dtype) + f * delta[i] * delta[j]
        self.mean += delta * (n_b / n_new.clamp_min(1))
        self.count = n_new

    def mean_value(self) -> Tensor:
        """The per-voxel mean ``(C, *spatial)`` (float64), in the units of the samples."""
        return self.mean if self.reference is None else self.mean + self.reference.to(self.dtype)

    def covariance(self, which: str = "total") -> Tensor:
        """Covariance components ``(n_comp, *spatial)``: ``total``, ``within`` or ``between`` (see module doc).

        NaN where fewer than two samples are valid (``total``) or no group has two valid draws (split).
        """
        nan = float("nan")
        total = self.within + self.between
        total = torch.where(self.count >= 2, total / (self.count - 1).clamp_min(1), nan)
        if which == "total":
            return total
        dof = self.count - self.groups
        within = torch.where(dof >= 1, self.within / dof.clamp_min(1), nan)
        if which == "within":
            return within
        if which == "between":
            return total - within
        raise ValueError(f"unknown covariance term {which!r}")


def trace(cov: Tensor, channels: int) -> Tensor:
    """Trace of a covariance stored as components (sum of the first ``channels`` diagonal entries)."""
    return cov[:channels].sum(0)
