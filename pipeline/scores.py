"""Per-pair QC summaries of an uncertainty result, and the statistics used to judge them.

Pair summaries (:func:`pair_summary`) are computed over an evaluation region of the target grid: the
target mask when the manifest gives one, else every voxel where the estimator reported a spread. They are what
the Parquet report holds per pair (all in mm unless stated).

The cohort decision built on these summaries (risk score, reasons, flags) is :mod:`equiqc.pipeline.decision`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equiqc.pipeline import transforms as T
from equiqc.pipeline.decision import DEVIATION_KEYS
from equiqc.pipeline.estimator import UncertaintyResult


def map_error_mm(phi: np.ndarray | Tensor, truth: np.ndarray | Tensor,
                 source_affine: np.ndarray) -> np.ndarray | Tensor:
    """Per-voxel distance (mm) between two maps given in source voxel units, ``(D, *target)`` each: numpy arrays
    in, a numpy array out; tensors in, a tensor out (on their device)."""
    p = torch.as_tensor(phi)
    g = torch.as_tensor(truth, dtype=p.dtype, device=p.device)
    d = p.shape[0]
    rotate = torch.as_tensor(np.asarray(source_affine)[:d, :d], dtype=p.dtype, device=p.device)
    # (a sum of squares over the leading axis: torch's vector_norm along it took 124 ms on a 2 mm grid on CPU)
    err = torch.einsum("ij,j...->i...", rotate, p - g).square().sum(0).sqrt()
    return err.numpy() if isinstance(phi, np.ndarray) else err


def fov_loss(phi: Tensor, source_shape: tuple[int, ...]) -> Tensor:
    """Boolean map (target grid): where the map ``phi`` (source voxel units, ``(D, *target)``) points outside the
    source image's voxel centres ``[0, n - 1]`` along any axis: anatomy the registration had to invent."""
    outside = torch.zeros(phi.shape[1:], dtype=torch.bool, device=phi.device)
    for d, n in enumerate(source_shape):
        outside |= (phi[d] < 0) | (phi[d] > n - 1) | ~torch.isfinite(phi[d])
    return outside


def _select(values: Tensor, region: Tensor) -> Tensor:
    """``values`` inside ``region``: a boolean mask of their shape, or flat indices into them (int64), which on CPU
    select 10x faster than the mask (32 vs 433 us at 32^3; the indices once: 200 us)."""
    return values.flatten().index_select(0, region) if region.dtype == torch.long else values[region]


def registered_source(source: Tensor | np.ndarray, phi: Tensor) -> Tensor:
    """The source image warped by the map ``phi`` (source voxels, ``(D, *target)``) onto the target grid (linear,
    zeros outside), float32 on ``phi``'s device."""
    return T.warp(torch.as_tensor(source, device=phi.device).float()[None, None], phi.float()[None])[0, 0]


def similarity_after_registration(warped: Tensor, target: Tensor, region: Tensor) -> float:
    """Normalised cross-correlation (Pearson) of the registered source (:func:`registered_source`) and the target
    over ``region`` (a mask or flat indices, :func:`_select`; tensors on one device), in float64: 1 for a perfect
    match up to intensity scale; NaN when either is constant or the region holds fewer than 3 voxels."""
    a, b = _select(warped, region).double(), _select(target, region).double()
    a, b = a - a.mean(), b - b.mean()
    scale = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / scale if a.numel() >= 3 and scale > 0 else float("nan")


def quantile(values: Tensor, q: float) -> float:
    """numpy's default (linear) quantile of a 1-D tensor, by selection: ``torch.quantile`` refuses inputs of more
    than 2^24 values (a 1 mm field of view holds 8.7 million voxels, a 0.7 mm one 25 million)."""
    position = q * (values.numel() - 1)
    below = int(np.floor(position))
    low = torch.kthvalue(values, below + 1).values
    if position == below:
        return float(low)
    high = torch.kthvalue(values, below + 2).values
    return float(low + (high - low) * (position - below))


def local_ncc(a: Tensor, b: Tensor, window: int) -> Tensor:
    """Local normalised cross-correlation of two images (``(*spatial)``, one grid) over cubic windows of ``window``
    voxels (odd) centred on each voxel: in [-1, 1]; 0 where either image is locally constant (windows cut at the
    edges). Box means as one 1-D average per axis (the counts of a cut box factorise, so this is the box mean
    exactly: 15 instead of 125 terms per voxel at 5 voxels; 0.1 s instead of 0.8 s on a 2 mm MNI grid), in
    float32 on images scaled to zero mean and unit sd (no cancellation in ``E[a^2] - E[a]^2``)."""
    d = a.dim()
    standard = [(x.double() - x.double().mean()) / x.double().std().clamp_min(1e-12) for x in (a, b)]
    x = torch.stack([standard[0], standard[1], standard[0] ** 2, standard[1] ** 2, standard[0] * standard[1]])
    x = x.float()[None]
    pool = F.avg_pool3d if d == 3 else F.avg_pool2d
    for axis in range(d):
        kernel = [1] * d
        kernel[axis] = window
        padding = [0] * d
        padding[axis] = window // 2
        x = pool(x, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=False)
    m = x[0].double()
    cov, va, vb = m[4] - m[0] * m[1], (m[2] - m[0] ** 2).clamp_min(0), (m[3] - m[1] ** 2).clamp_min(0)
    scale = (va * vb).sqrt()
    tiny = 1e-6 * float(scale.max()) if scale.numel() and float(scale.max()) > 0 else 1.0
    return torch.where(scale > tiny, cov / scale.clamp_min(tiny), torch.zeros_like(cov)).clamp(-1, 1)


LNCC_WINDOW_MM = 9.0  # local similarity windows: about 9 mm across (5 voxels at 2 mm, 9 at 1 mm)


def lncc_window(affine: np.ndarray) -> int:
    """Odd window (voxels) of about :data:`LNCC_WINDOW_MM` on a grid of ``affine``'s spacing (at least 3)."""
    spacing = float(np.mean(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    return max(3, 2 * round((LNCC_WINDOW_MM / spacing - 1) / 2) + 1)


def world_displacement_mm(phi: Tensor, source_affine: np.ndarray, target_affine: np.ndarray) -> Tensor:
    """Per-voxel world displacement (mm, ``(D, *target)``) of a map ``phi`` (source voxels, ``(D, *target)``):
    ``A_source phi(x) - A_target x``."""
    d = phi.shape[0]
    a_s = torch.as_tensor(np.asarray(source_affine), dtype=torch.float64, device=phi.device)
    a_t = torch.as_tensor(np.asarray(target_affine), dtype=torch.float64, device=phi.device)
    grid = T.identity_grid(phi.shape[1:], torch.float64, phi.device)[0]
    src = torch.einsum("ij,j...->i...", a_s[:d, :d], phi.double()) + a_s[:d, d].view(d, *[1] * d)
    tgt = torch.einsum("ij,j...->i...", a_t[:d, :d], grid) + a_t[:d, d].view(d, *[1] * d)
    return src - tgt


def nonlinear_part_mm(disp: Tensor, region: Tensor) -> Tensor:
    """Distance (mm, ``(*target)``) of a world displacement ``disp`` (``(D, *target)``, mm) from its least-squares
    affine fit over ``region`` (flat indices): the size of the deformation's nonlinear part per voxel."""
    d = disp.shape[0]
    grid = T.identity_grid(disp.shape[1:], torch.float64, disp.device)[0].reshape(d, -1)
    design = torch.cat([grid, torch.ones_like(grid[:1])]).T  # (voxels, D + 1)
    values = disp.reshape(d, -1).T
    step = max(1, region.numel() // 200_000)  # the fit from at most ~200k voxels of the region
    fit = torch.linalg.lstsq(design[region[::step]], values[region[::step]]).solution
    return (values - design @ fit).square().sum(1).sqrt().reshape(disp.shape[1:])


SUMMARY_KEYS = ("uncertainty_mean_mm", "uncertainty_median_mm", "uncertainty_p95_mm", "frac_above_1mm",
                "frac_above_2mm", "folding_fraction", "fov_loss_fraction", "similarity_ncc", "similarity_lncc",
                "deformation_mean_mm", "nonlinear_mean_mm", "log_jacobian_sd")


def pair_summary(result: UncertaintyResult, source_affine: np.ndarray, region: np.ndarray | None = None,
                 labels: np.ndarray | None = None, ground_truth: np.ndarray | None = None,
                 source_shape: tuple[int, ...] | None = None, source: np.ndarray | None = None,
                 target: np.ndarray | None = None, label_names: dict[int, str] | None = None,
                 target_affine: np.ndarray | None = None, device: str | torch.device = "cpu") -> dict:
    """Summaries of one pair's result over ``region`` (bool, target grid), per label, and vs ground truth, computed
    with torch on ``device`` (a GPU worker summarises on its GPU, a few ms, instead of seconds of CPU at 1 mm).

    ``labels``: an integer label volume on the target grid; gives ``uncertainty_mean_mm_<name>`` for every nonzero
    label in it (NaN when none of its voxels is in the region), ``<name>`` from ``label_names`` (label value ->
    name), else ``label<value>``.
    ``source_shape``: the source grid's shape; gives ``fov_loss_fraction``, the fraction of the region that the
    unperturbed prediction maps outside the source image (:func:`fov_loss`).
    ``source`` and ``target`` (the images): give ``similarity_ncc``, their correlation after registration by the
    unperturbed prediction over the region (:func:`similarity_after_registration`), and ``similarity_lncc``, the
    mean over the region of their local correlation (:func:`local_ncc`, windows of about 9 mm): the
    registration's residual mismatch, which a failure the spread cannot see (the same miss in every perturbed
    frame) still leaves.
    ``target_affine`` (default: the source's): gives the size of the predicted deformation over the region:
    ``deformation_mean_mm`` (mean world displacement, :func:`world_displacement_mm`), ``nonlinear_mean_mm`` (mean
    distance from its affine fit, :func:`nonlinear_part_mm`); and ``log_jacobian_sd``, the standard deviation of
    the log Jacobian determinant (clamped at 1e-3) over the region.
    ``ground_truth``: the true map (source voxels, ``(D, *target)``): gives ``true_error_mean_mm`` (error of the
    unperturbed prediction, the registration a user uses), ``tta_error_mean_mm`` (of the mean map) and
    ``voxel_spearman_std_error``.
    A result whose prediction was given (a pipeline's transform file) also gets :func:`transform_deviation`.
    Fractions and means are over the region's voxels, in float64; quantiles interpolate linearly, as numpy's.
    """
    dev = torch.device(device)
    std_all = torch.as_tensor(result.std_mm, device=dev)
    valid = torch.isfinite(std_all)  # where the estimator reported a spread (enough valid samples)
    mask = valid if region is None else (torch.as_tensor(region, device=dev).bool() & valid)
    region = mask.flatten().nonzero().squeeze(1)  # flat indices: selected once, used for every map below
    std = _select(std_all, region).double()
    out: dict = {"n_region_voxels": int(std.numel())}
    phi = torch.as_tensor(result.prediction_map, dtype=torch.float32, device=dev)
    if std.numel() == 0:
        out.update(dict.fromkeys(SUMMARY_KEYS, np.nan))
    else:
        jac = _select(T.jacobian_determinant(phi.double()[None])[0], region)
        target_affine = source_affine if target_affine is None else target_affine
        disp = world_displacement_mm(phi, source_affine, target_affine)
        out.update({
            "uncertainty_mean_mm": float(std.mean()),
            "uncertainty_median_mm": quantile(std, 0.5),
            "uncertainty_p95_mm": quantile(std, 0.95),
            "frac_above_1mm": float((std > 1.0).double().mean()),
            "frac_above_2mm": float((std > 2.0).double().mean()),
            "folding_fraction": float((jac <= 0).double().mean()),
            "fov_loss_fraction": float(_select(fov_loss(phi, source_shape), region).double().mean())
            if source_shape is not None else np.nan,
            "similarity_ncc": np.nan, "similarity_lncc": np.nan,
            "deformation_mean_mm": float(_select(disp.square().sum(0).sqrt(), region).mean()),
            "nonlinear_mean_mm": float(_select(nonlinear_part_mm(disp, region), region).mean()),
            "log_jacobian_sd": float(jac.clamp_min(1e-3).log().std()) if jac.numel() > 1 else 0.0,
        })
        if source is not None and target is not None:
            tgt = torch.as_tensor(target, device=dev).float()
            warped = registered_source(source, phi)
            lncc = local_ncc(warped, tgt, lncc_window(target_affine))
            out.update(similarity_ncc=similarity_after_registration(warped, tgt, region),
                       similarity_lncc=float(_select(lncc, region).mean()))
    if result.prediction_given:
        out.update(transform_deviation(result, source_affine, region, dev))
    if labels is not None:
        out.update(_label_means(torch.as_tensor(labels, device=dev), region, std, label_names or {}))
    if ground_truth is not None:
        truth = torch.as_tensor(ground_truth, dtype=torch.float32, device=dev)
        err = _select(map_error_mm(phi, truth, source_affine), region).double()
        tta = _select(map_error_mm(torch.nan_to_num(torch.as_tensor(result.mean_map, device=dev).float()), truth,
                                   source_affine), region).double()
        out["true_error_mean_mm"] = float(err.mean()) if err.numel() else np.nan
        out["tta_error_mean_mm"] = float(tta.mean()) if tta.numel() else np.nan
        if err.numel():  # voxel-level agreement of uncertainty with the prediction's true error
            out["voxel_spearman_std_error"] = spearman(std.cpu().numpy(), err.cpu().numpy())
    return out


def transform_deviation(result: UncertaintyResult, source_affine: np.ndarray, region: Tensor,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """How far a given registration (``result.prediction_map``, e.g. a pipeline's transform file) lies from what
    the method reproduces, the perturbed registrations' mean map (``result.mean_map``): the mean and 95th
    percentile over ``region`` (flat indices) of their per-voxel distance in mm (``transform_deviation_mean_mm``,
    ``transform_deviation_p95_mm``); NaN where the region holds no voxel with a mean map."""
    mean = torch.as_tensor(result.mean_map, dtype=torch.float32, device=device)
    phi = torch.as_tensor(result.prediction_map, dtype=torch.float32, device=device)
    dist = _select(map_error_mm(phi, mean, source_affine), region).double()
    dist = dist[torch.isfinite(dist)]
    if dist.numel() == 0:
        return dict.fromkeys(DEVIATION_KEYS, np.nan)
    return {"transform_deviation_mean_mm": float(dist.mean()), "transform_deviation_p95_mm": quantile(dist, 0.95)}


def _label_means(labels: Tensor, region: Tensor, std: Tensor, names: dict[int, str]) -> dict[str, float]:
    """``uncertainty_mean_mm_<name>`` of every nonzero label of ``labels``: the mean of ``std`` (the region's
    values, float64) over the label's voxels in ``region`` (flat indices), by one bincount for all labels."""
    values = torch.unique(labels)
    values = values[values != 0]
    inside, index = torch.unique(_select(labels, region), return_inverse=True)
    sums = torch.bincount(index, weights=std, minlength=inside.numel())
    counts = torch.bincount(index, minlength=inside.numel())
    means = dict(zip(inside.tolist(), (sums / counts).tolist(), strict=True))
    return {f"uncertainty_mean_mm_{names.get(int(v), f'label{int(v)}')}": means.get(int(v), np.nan)
            for v in values.tolist()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks; scipy); NaN for fewer than 3 values or a constant input."""
    from scipy import stats  # here, not at the top: 1.3 s of import that every worker's summaries would pay

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positives``: the Mann-Whitney U statistic over
    ``n_pos n_neg`` (ties count half; scipy). NaN when either class is empty or a score is not finite."""
    from scipy import stats

    scores, positives = np.asarray(scores, float), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if pos.size == 0 or neg.size == 0 or not np.isfinite(scores).all():
        return float("nan")
    return float(stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic / (pos.size * neg.size))


def sparsification_naurc(uncertainty: np.ndarray, error: np.ndarray, steps: int = 100, seed: int = 0) -> float:
    """Normalised area under the sparsification curve of an uncertainty map against the true error (per voxel,
    any units): 0 when the uncertainty orders the voxels exactly as the error does, 1 when it orders them no
    better than chance, above 1 when worse.

    Sparsification: remove the fraction ``f`` of voxels with the highest uncertainty (``f = 0, 1/steps, ...``) and
    take the mean error of the rest; the area under that curve (mean over ``f``) is AURC. With the same curve for
    the oracle (voxels removed by their true error) and for a random order (the mean error, flat),
    ``nAURC = (AURC - AURC_oracle) / (AURC_random - AURC_oracle)``. Ties in the uncertainty are broken at random
    (``seed``), so a constant map scores about 1. NaN for fewer than ``steps`` finite voxels or a constant error.
    Written here because no maintained library computes it (scikit-learn has no sparsification curve).
    """
    u, e = np.asarray(uncertainty, float).ravel(), np.asarray(error, float).ravel()
    keep = np.isfinite(u) & np.isfinite(e)
    u, e = u[keep], e[keep]
    n = e.size
    if n < steps or np.ptp(e) == 0:
        return float("nan")
    shuffle = np.random.default_rng(seed).permutation(n)  # random tie-breaking under the stable sort below
    removed = np.arange(steps) * n // steps  # voxels removed at each point of the curve

    def aurc(key: np.ndarray) -> float:
        order = shuffle[np.argsort(-key[shuffle], kind="stable")]  # highest first
        tail_sums = np.cumsum(e[order][::-1])[::-1]  # tail_sums[k] = sum of the errors after removing k voxels
        return float(np.mean(tail_sums[removed] / (n - removed)))

    oracle = aurc(e)
    return (aurc(u) - oracle) / (float(e.mean()) - oracle)
