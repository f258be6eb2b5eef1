"""Per-pair QC summaries of an uncertainty result, and the statistics used to judge them.

Pair summaries (:func:`pair_summary`) are computed over an evaluation region of the target grid: the
target mask when the manifest gives one, else every voxel where the estimator reported a spread. They are what
the Parquet report holds per pair (all in mm unless stated).

The cohort decision built on these summaries (risk score, reasons, flags) is :mod:`equiqc.pipeline.decision`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from equiqc.pipeline import transforms as T
from equiqc.pipeline.estimator import UncertaintyResult


def map_error_mm(phi: np.ndarray, truth: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Per-voxel distance (mm) between two maps given in source voxel units."""
    d = phi.shape[0]
    return np.linalg.norm(np.einsum("ij,j...->i...", source_affine[:d, :d], phi - truth), axis=0)


def fov_loss(phi: np.ndarray, source_shape: tuple[int, ...]) -> np.ndarray:
    """Boolean map (target grid): where the map ``phi`` (source voxel units, ``(D, *target)``) points outside the
    source image's voxel centres ``[0, n - 1]`` along any axis: anatomy the registration had to invent."""
    outside = np.zeros(phi.shape[1:], bool)
    for d, n in enumerate(source_shape):
        outside |= (phi[d] < 0) | (phi[d] > n - 1) | ~np.isfinite(phi[d])
    return outside


def similarity_after_registration(source: np.ndarray, target: np.ndarray, phi: np.ndarray, region: np.ndarray) -> float:
    """Normalised cross-correlation (Pearson) of the source warped by ``phi`` (source voxels, ``(D, *target)``)
    and the target over ``region``: 1 for a perfect match up to intensity scale; NaN when either is constant."""
    warped = T.warp(torch.as_tensor(source, dtype=torch.float32)[None, None],
                    torch.as_tensor(phi, dtype=torch.float32)[None])[0, 0].numpy()
    a, b = warped[region].astype(np.float64), np.asarray(target)[region].astype(np.float64)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def pair_summary(result: UncertaintyResult, source_affine: np.ndarray, region: np.ndarray | None = None,
                 labels: dict[str, np.ndarray] | None = None, ground_truth: np.ndarray | None = None,
                 source_shape: tuple[int, ...] | None = None, source: np.ndarray | None = None,
                 target: np.ndarray | None = None) -> dict:
    """Summaries of one pair's result over ``region`` (bool, target grid), per label, and vs ground truth.

    ``labels``: name -> boolean mask on the target grid; gives ``uncertainty_mean_mm_<name>``.
    ``source_shape``: the source grid's shape; gives ``fov_loss_fraction``, the fraction of the region that the
    unperturbed prediction maps outside the source image (:func:`fov_loss`).
    ``source`` and ``target`` (the images): give ``similarity_ncc``, their correlation after registration by the
    unperturbed prediction over the region (:func:`similarity_after_registration`).
    ``ground_truth``: the true map (source voxels, ``(D, *target)``): gives ``true_error_mean_mm`` (error of the
    unperturbed prediction, the registration a user uses) and ``tta_error_mean_mm`` (of the mean map).
    """
    valid = np.isfinite(result.std_mm)  # where the estimator reported a spread (enough valid samples)
    region = valid if region is None else (region.astype(bool) & valid)
    std = result.std_mm[region].astype(np.float64)
    out: dict = {"n_region_voxels": int(region.sum())}
    if std.size == 0:
        out.update({k: np.nan for k in ("uncertainty_mean_mm", "uncertainty_median_mm", "uncertainty_p95_mm",
                                        "frac_above_1mm", "frac_above_2mm", "folding_fraction", "fov_loss_fraction",
                                        "similarity_ncc")})
    else:
        jac = T.jacobian_determinant(torch.as_tensor(result.prediction_map, dtype=torch.float64)[None])
        out.update({
            "uncertainty_mean_mm": float(std.mean()),
            "uncertainty_median_mm": float(np.median(std)),
            "uncertainty_p95_mm": float(np.percentile(std, 95)),
            "frac_above_1mm": float((std > 1.0).mean()),
            "frac_above_2mm": float((std > 2.0).mean()),
            "folding_fraction": float((jac[0].numpy()[region] <= 0).mean()),
            "fov_loss_fraction": fov_loss(result.prediction_map, source_shape)[region].mean().item()
            if source_shape is not None else np.nan,
            "similarity_ncc": similarity_after_registration(source, target, result.prediction_map, region)
            if source is not None and target is not None else np.nan,
        })
    for name, mask in (labels or {}).items():
        sel = mask.astype(bool) & region
        out[f"uncertainty_mean_mm_{name}"] = float(result.std_mm[sel].mean()) if sel.any() else np.nan
    if ground_truth is not None:
        err = map_error_mm(result.prediction_map, ground_truth, source_affine)
        out["true_error_mean_mm"] = float(err[region].mean()) if region.any() else np.nan
        tta = map_error_mm(np.nan_to_num(result.mean_map), ground_truth, source_affine)
        out["tta_error_mean_mm"] = float(tta[region].mean()) if region.any() else np.nan
        if region.any():  # voxel-level agreement of uncertainty with the prediction's true error
            out["voxel_spearman_std_error"] = spearman(std, err[region])
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks; scipy); NaN for fewer than 3 values or a constant input."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positives``: the Mann-Whitney U statistic over
    ``n_pos n_neg`` (ties count half; scipy). NaN when either class is empty or a score is not finite."""
    scores, positives = np.asarray(scores, float), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if pos.size == 0 or neg.size == 0 or not np.isfinite(scores).all():
        return float("nan")
    return float(stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic / (pos.size * neg.size))
