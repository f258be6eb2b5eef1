"""Per-pair QC summaries of an uncertainty result, and cohort-level risk scores.

Pair summaries (:func:`pair_summary`) are computed over an evaluation region of the target grid: the
target mask when the manifest gives one, else every voxel with at least two valid samples. They are what
the Parquet report holds per pair (all in mm unless stated).

Cohort scoring (:func:`cohort_scores`): for each of ``uncertainty_mean_mm``, ``uncertainty_p95_mm`` and
``frac_above_2mm`` a robust z-score against the cohort's complete pairs, ``z = (x - median) / (1.4826 MAD)``
(MAD floored at 5 % of the median, so a very homogeneous cohort does not turn tiny differences into large
scores); ``risk_score`` is the mean of the three z-scores. A pair is ``flagged`` when its risk score exceeds
``z_threshold`` (default 3) or, whatever the cohort, its ``uncertainty_p95_mm`` exceeds ``abs_threshold_mm``
(default 4 mm) or its prediction folds in more than ``folding_threshold`` of the region (default 1 %).
Failed pairs get no score and are flagged (they need a look).
"""

from __future__ import annotations

import numpy as np

from equiqc.pipeline.estimator import UncertaintyResult

RISK_METRICS = ("uncertainty_mean_mm", "uncertainty_p95_mm", "frac_above_2mm")


def _jacobian_det(phi: np.ndarray) -> np.ndarray:
    grads = [np.gradient(phi[i]) for i in range(phi.shape[0])]
    jac = np.stack([np.stack(g, -1) for g in grads], -2)
    return np.linalg.det(jac)


def map_error_mm(phi: np.ndarray, truth: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Per-voxel distance (mm) between two maps given in source voxel units."""
    d = phi.shape[0]
    return np.linalg.norm(np.einsum("ij,j...->i...", source_affine[:d, :d], phi - truth), axis=0)


def pair_summary(result: UncertaintyResult, source_affine: np.ndarray, region: np.ndarray | None = None,
                 labels: dict[str, np.ndarray] | None = None, ground_truth: np.ndarray | None = None) -> dict:
    """Summaries of one pair's result over ``region`` (bool, target grid), per label, and vs ground truth.

    ``labels``: name -> boolean mask on the target grid; gives ``uncertainty_mean_mm_<name>``.
    ``ground_truth``: the true map (source voxels, ``(D, *target)``): gives ``true_error_mean_mm`` (error of the
    unperturbed prediction, the registration a user uses) and ``tta_error_mean_mm`` (of the mean map).
    """
    valid = result.n_valid >= 2
    region = valid if region is None else (region.astype(bool) & valid)
    std = result.std_mm[region].astype(np.float64)
    out: dict = {"n_region_voxels": int(region.sum())}
    if std.size == 0:
        out.update({k: np.nan for k in ("uncertainty_mean_mm", "uncertainty_median_mm", "uncertainty_p95_mm",
                                        "frac_above_1mm", "frac_above_2mm", "folding_fraction")})
    else:
        out.update({
            "uncertainty_mean_mm": float(std.mean()),
            "uncertainty_median_mm": float(np.median(std)),
            "uncertainty_p95_mm": float(np.percentile(std, 95)),
            "frac_above_1mm": float((std > 1.0).mean()),
            "frac_above_2mm": float((std > 2.0).mean()),
            "folding_fraction": float((_jacobian_det(result.prediction_map)[region] <= 0).mean()),
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


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def robust_z(values: np.ndarray) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)`` over the finite values; MAD floored at 5 % of |median| (and 1e-9)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full_like(values, np.nan, dtype=np.float64)
    med = np.median(finite)
    mad = 1.4826 * np.median(np.abs(finite - med))
    return (values - med) / max(mad, 0.05 * abs(med), 1e-9)


def cohort_scores(rows: list[dict], z_threshold: float = 3.0, abs_threshold_mm: float = 4.0,
                  folding_threshold: float = 0.01) -> list[dict]:
    """Add ``risk_score`` and ``flagged`` to each complete row (see module docstring); returns the rows."""
    complete = [r for r in rows if r.get("status") == "complete"]
    if complete:
        zs = [robust_z(np.array([r.get(m, np.nan) for r in complete], dtype=np.float64)) for m in RISK_METRICS]
        risk = np.nanmean(np.stack(zs), axis=0) if len(complete) > 1 else np.zeros(len(complete))
        for r, score in zip(complete, risk, strict=True):
            r["risk_score"] = float(score)
            r["flagged"] = bool(score > z_threshold
                                or r.get("uncertainty_p95_mm", 0) > abs_threshold_mm
                                or r.get("folding_fraction", 0) > folding_threshold)
    for r in rows:
        if r.get("status") != "complete":
            r["risk_score"], r["flagged"] = np.nan, True
    return rows


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``positives`` (ties count half)."""
    scores, positives = np.asarray(scores, float), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))
