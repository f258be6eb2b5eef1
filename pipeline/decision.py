"""The QC decision for a cohort: bounded cohort context, a risk score, and named reasons for every flag.

Pure computation on the per-pair summary rows (no I/O). Conventions (all distances in mm):

* **Reasons** come from one vocabulary, :data:`REASONS`; a flagged pair lists every reason that applies:

  - ``failed``: the pair has no result (ingest or estimation failed), or a summary it needs is not finite
    although its region is not empty;
  - ``empty_region``: the evaluation region holds no voxel with a spread (no overlap of mask and valid
    samples): nothing can be said, so it is flagged, never passed;
  - ``uncertainty``: the error may be above the user's tolerance ``tolerance_mm``: the calibrated upper bound
    ``expected_error_upper_mm`` (:mod:`equiqc.pipeline.calibration`) is above it, or the mean spread
    ``uncertainty_mean_mm`` is: the spread is a lower bound of the RMS error (docs/design.md), so a pair over
    the tolerance by its spread alone is over it, whatever a calibration fitted on other pairs predicts;
  - ``outlier``: ``uncertainty_p95_mm`` beyond the cohort's upper robust fence on a log scale,
    ``log(x + floor) > median + k MAD`` of the complete pairs' ``log(p95 + floor)`` (``noise_floor_mm``,
    ``fence_mad``; :func:`robust_fences`), and at least ``min_outlier_ratio`` times the cohort median (so a very
    homogeneous cohort does not turn tiny differences into outliers); needs at least
    :data:`MIN_COHORT_FOR_OUTLIERS` complete pairs;
  - ``folding``: ``folding_fraction`` of the prediction above ``folding_threshold``;
  - ``fov``: the prediction maps more than ``fov_threshold`` of the region outside the source image
    (``fov_loss_fraction``: the registration had to invent that anatomy);
  - ``deviation``: the pair's registration was given (a pipeline's transform file, manifest column
    ``transform``) and lies far from what the method reproduces: ``transform_deviation_p95_mm`` (95th percentile
    over the region of its distance from the perturbed registrations' mean) above both ``deviation_mm`` (a
    difference that matters) and :data:`DEVIATION_SPREAD_FACTOR` times the pair's own ``uncertainty_p95_mm`` (a
    transform the method reproduces lies within its spread: one more draw of the ensemble would be about one
    spread from its mean);
  - ``similarity``: the correlation of the registered source with the target (``similarity_ncc``) is below the
    cohort's lower robust fence, ``median - k MAD`` of the complete pairs' values, and at least
    ``min_similarity_drop`` below the cohort median (needs :data:`MIN_COHORT_FOR_OUTLIERS` pairs).

  Both fences use the median and the median absolute deviation (MAD, scaled by 1.4826 to a normal sd; the
  modified z-score of Iglewicz and Hoaglin, cut at ``fence_mad = 3.5``): their breakdown point is 50 %, so they
  keep working while up to half of the cohort fails (a Tukey fence on the quartiles stops at 25 %: with a third
  of a cohort failing, its lower quartile lies among the failures). With a MAD of 0 (most pairs identical) the
  fence sits at the median and the minimum drop or ratio decides.

* **risk_score** is ``log2((p95 + floor) / (cohort median p95 + floor))`` clipped to
  ``[-RISK_BOUND, RISK_BOUND]``: +1 means twice the cohort's typical 95th-percentile spread. It is finite
  for every complete pair; a pair with no finite p95 (empty region) gets ``+RISK_BOUND``, a failed pair NaN.
  A cohort of one, or of identical pairs, scores 0. Nothing divides by a spread that can vanish.
* ``cohort_percentile`` is the percentile (0-100, ties averaged) of the pair's p95 among the complete pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REASONS = ("failed", "empty_region", "uncertainty", "outlier", "similarity", "folding", "fov", "deviation")
# a given transform's distance from what the method reproduces (equiqc.pipeline.scores.transform_deviation)
DEVIATION_KEYS = ("transform_deviation_mean_mm", "transform_deviation_p95_mm")
DEVIATION_SPREAD_FACTOR = 3.0
RISK_BOUND = 8.0
MIN_COHORT_FOR_OUTLIERS = 5
CONTEXT_METRIC = "uncertainty_p95_mm"


@dataclass(frozen=True)
class DecisionRules:
    """Thresholds of the decision (see module docstring)."""

    tolerance_mm: float = 3.0
    folding_threshold: float = 0.01
    noise_floor_mm: float = 0.1
    fence_mad: float = 3.5
    min_outlier_ratio: float = 1.5
    fov_threshold: float = 0.05
    min_similarity_drop: float = 0.1
    # 1 mm: on the ANTs validation cohort (docs/models/ants.md) a pair's own transform file deviated 0.04-0.75 mm
    # (p95), a truncated registration 1.29-3.93 mm, another subject's or a flipped header's 6.8-59 mm
    deviation_mm: float = 1.0


def _finite(x) -> bool:
    try:
        return bool(np.isfinite(float(x)))
    except (TypeError, ValueError):
        return False


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (finite), ties given their average rank: what ``scipy.stats.rankdata(values,
    "average")`` returns, from two binary searches of the sorted values (scipy.stats costs the client about 1 s of
    import for this alone)."""
    ordered = np.sort(values)
    return (np.searchsorted(ordered, values, "left") + np.searchsorted(ordered, values, "right") + 1) / 2


def robust_fences(values: np.ndarray, k: float) -> tuple[float, float, float]:
    """``(median - k s, median, median + k s)`` of finite ``values``, ``s = 1.4826 MAD`` (a normal sd; numpy, not
    ``scipy.stats.median_abs_deviation``: scipy's import costs the client about 1 s for two medians)."""
    median = float(np.median(values))
    s = 1.4826 * float(np.median(np.abs(values - median)))
    return median - k * s, median, median + k * s


def cohort_context(values: np.ndarray, floor_mm: float, fence_mad: float,
                   min_ratio: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(risk_score, percentile, outlier)`` of each value against the finite values (see module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    risk = np.full(values.shape, RISK_BOUND)
    percentile = np.full(values.shape, np.nan)
    outlier = np.zeros(values.shape, bool)
    if not finite.any():
        return risk, percentile, outlier
    logs = np.log2(np.maximum(values[finite], 0) + floor_mm)
    risk[finite] = np.clip(logs - np.median(logs), -RISK_BOUND, RISK_BOUND)
    percentile[finite] = average_ranks(values[finite]) / finite.sum() * 100
    if finite.sum() >= MIN_COHORT_FOR_OUTLIERS:
        _, median, high = robust_fences(logs, fence_mad)
        outlier[finite] = logs > max(high, median + np.log2(min_ratio))
    return risk, percentile, outlier


def _low_outliers(values: np.ndarray, fence_mad: float, min_drop: float) -> np.ndarray:
    """Values below both ``median - k MAD`` and ``median - min_drop`` of the finite values (cohort >= minimum)."""
    low = np.zeros(values.shape, bool)
    finite = np.isfinite(values)
    if finite.sum() >= MIN_COHORT_FOR_OUTLIERS:
        fence, median, _ = robust_fences(values[finite], fence_mad)
        low[finite] = values[finite] < min(fence, median - min_drop)
    return low


def decide(rows: list[dict], rules: DecisionRules = DecisionRules()) -> list[dict]:
    """Add ``risk_score``, ``cohort_percentile``, ``flag_reasons`` (a list from :data:`REASONS`) and ``flagged`` to
    every row, in place; returns the rows."""
    complete = [r for r in rows if r.get("status") == "complete"]
    low_similarity = _low_outliers(np.array([r.get("similarity_ncc", np.nan) for r in complete], float),
                                   rules.fence_mad, rules.min_similarity_drop)
    risk, percentile, outlier = cohort_context(np.array([r.get(CONTEXT_METRIC, np.nan) for r in complete], float),
                                               rules.noise_floor_mm, rules.fence_mad, rules.min_outlier_ratio)
    for r, score, pct, out, dissimilar in zip(complete, risk, percentile, outlier, low_similarity, strict=True):
        reasons = []
        voxels = r.get("n_region_voxels")
        empty = not _finite(voxels) or float(voxels) == 0
        if empty:
            reasons.append("empty_region")
        elif not all(_finite(r.get(k)) for k in ("uncertainty_mean_mm", CONTEXT_METRIC, "folding_fraction")):
            reasons.append("failed")
        bounds = [float(r[k]) for k in ("expected_error_upper_mm", "uncertainty_mean_mm") if _finite(r.get(k))]
        if bounds and max(bounds) > rules.tolerance_mm:
            reasons.append("uncertainty")
        if out:
            reasons.append("outlier")
        if dissimilar:
            reasons.append("similarity")
        if _finite(r.get("folding_fraction")) and float(r["folding_fraction"]) > rules.folding_threshold:
            reasons.append("folding")
        if _finite(r.get("fov_loss_fraction")) and float(r["fov_loss_fraction"]) > rules.fov_threshold:
            reasons.append("fov")
        if _finite(r.get(DEVIATION_KEYS[1])) and float(r[DEVIATION_KEYS[1]]) > max(
                rules.deviation_mm, DEVIATION_SPREAD_FACTOR * float(r.get(CONTEXT_METRIC, 0.0))):
            reasons.append("deviation")
        r.update(risk_score=float(score), cohort_percentile=float(pct), flag_reasons=reasons, flagged=bool(reasons))
    for r in rows:
        if r.get("status") != "complete":
            r.update(risk_score=np.nan, cohort_percentile=np.nan, flag_reasons=["failed"], flagged=True)
    return rows
