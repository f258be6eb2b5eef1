"""Calibration: from a pair's spread (mm) to its expected registration error (mm) and an upper bound.

Pure numpy/scipy on per-pair summaries; reading and writing calibration files is
:mod:`equiqc.storage.calibration`, building the calibration cohort is :mod:`equiqc.workflows.calibrate`.

Model (all distances in mm, over the pair's evaluation region):

* feature ``x = log(uncertainty_mean_mm + floor_mm)`` (the mean per-voxel spread, :data:`FEATURE`);
  target ``y = log(true_error_mean_mm)`` (the mean error of the unperturbed prediction, :data:`TARGET`,
  known on a calibration cohort of synthetic pairs with true maps);
* ``y = a + b x + e``, ordinary least squares (``scipy.stats.linregress``), the slope held at ``b >= 0`` (more
  spread never predicts less error; when the data say otherwise, ``b = 0`` and ``a = mean(y)``);
* ``expected_error_mm = exp(a + b x) * smearing``, with Duan's smearing factor ``mean(exp(e_i))`` so the value
  estimates the mean error, not its geometric mean;
* ``expected_error_upper_mm``: the one-sided **jackknife+** upper bound (Barber, Candes, Ramdas, Tibshirani,
  *Predictive inference with the jackknife+*, Ann. Statist. 2021) at ``coverage`` (e.g. 0.9): with the
  leave-one-out fits ``f_-i`` and residuals ``R_i = y_i - f_-i(x_i)``, the upper bound is the
  ``ceil(coverage (n + 1))``-th smallest of ``f_-i(x) + R_i``, back on the mm scale. For pairs exchangeable with
  the calibration cohort it covers the true mean error with probability about ``coverage`` (at least
  ``1 - 2 (1 - coverage)`` in the worst case). It needs ``n >= ceil(coverage / (1 - coverage))`` pairs (9 at 0.9).

Written by hand (numpy, ``scipy.stats.linregress``) rather than with a conformal library because the result
must be a small, readable JSON file applied at run time without the fitting library: two numbers per
leave-one-out fit.

What a calibration cannot see: an error that is the same in every perturbed frame (a bias of the model, or a
failure such as a large rotation that the model misses identically each time) has no spread, so it predicts
a small error. The bound holds for pairs like the calibration cohort (its ``cohort`` record says which).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FEATURE = "uncertainty_mean_mm"
TARGET = "true_error_mean_mm"


@dataclass(frozen=True)
class Calibration:
    """A fitted mapping (see module docstring). ``loo``: ``(a_-i, b_-i, R_i)`` per calibration pair."""

    intercept: float
    slope: float
    smearing: float
    coverage: float
    floor_mm: float
    loo: tuple[tuple[float, float, float], ...]
    feature_range_mm: tuple[float, float]

    @property
    def n(self) -> int:
        return len(self.loo)

    def predict(self, spread_mm) -> tuple[np.ndarray, np.ndarray]:
        """``(expected_error_mm, expected_error_upper_mm)`` for mean spreads (mm); NaN where the spread is not
        finite."""
        s = np.atleast_1d(np.asarray(spread_mm, dtype=np.float64))
        ok = np.isfinite(s)
        x = np.log(np.maximum(np.where(ok, s, 0.0), 0.0) + self.floor_mm)
        expected = np.exp(self.intercept + self.slope * x) * self.smearing
        loo = np.asarray(self.loo, dtype=np.float64)
        values = loo[:, 0][None] + loo[:, 1][None] * x[:, None] + loo[:, 2][None]  # (pairs, n)
        k = math.ceil(self.coverage * (self.n + 1))
        upper = np.exp(np.sort(values, axis=1)[:, k - 1])
        return np.where(ok, expected, np.nan), np.where(ok, upper, np.nan)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loo"] = [list(t) for t in self.loo]
        d["feature_range_mm"] = list(self.feature_range_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(float(d["intercept"]), float(d["slope"]), float(d["smearing"]), float(d["coverage"]),
                   float(d["floor_mm"]), tuple(tuple(float(v) for v in t) for t in d["loo"]),
                   tuple(float(v) for v in d["feature_range_mm"]))


def minimum_pairs(coverage: float) -> int:
    """The fewest calibration pairs for which the jackknife+ bound at ``coverage`` is finite."""
    return math.ceil(coverage / (1 - coverage) - 1e-9)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b x`` with ``b >= 0``."""
    from scipy import stats  # here, not at import: a run applies calibrations and never fits one (0.9 s of import)

    if len(x) >= 2 and np.ptp(x) > 0:
        fit = stats.linregress(x, y)
        if fit.slope >= 0:
            return float(fit.intercept), float(fit.slope)
    return float(np.mean(y)), 0.0


def fit_calibration(spread_mm, error_mm, coverage: float = 0.9, floor_mm: float = 0.1) -> Calibration:
    """Fit the mapping on calibration pairs: their mean spreads and true mean errors (mm, finite, error > 0).

    Raises ValueError when the pairs are too few for ``coverage`` (:func:`minimum_pairs`) or not usable."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage} must be between 0 and 1")
    s, e = np.asarray(spread_mm, dtype=np.float64), np.asarray(error_mm, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(e) & (e > 0) & (s >= 0)
    s, e = s[ok], e[ok]
    if len(s) < max(minimum_pairs(coverage), 3):
        raise ValueError(f"{len(s)} usable calibration pairs; a {coverage:.0%} bound needs at least "
                         f"{max(minimum_pairs(coverage), 3)} (pairs with a finite spread and a true error above 0)")
    x, y = np.log(s + floor_mm), np.log(e)
    a, b = _line(x, y)
    smearing = float(np.mean(np.exp(y - (a + b * x))))
    loo = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        ai, bi = _line(x[keep], y[keep])
        loo.append((ai, bi, float(y[i] - (ai + bi * x[i]))))
    return Calibration(a, b, smearing, coverage, floor_mm, tuple(loo), (float(s.min()), float(s.max())))


def coverage_interval(covered: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a coverage measured as ``covered`` of ``n`` pairs."""
    from scipy import stats

    ci = stats.binomtest(covered, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def apply_calibration(rows: list[dict], calibration: Calibration | None) -> list[dict]:
    """Set ``expected_error_mm`` and ``expected_error_upper_mm`` on every complete row (NaN without a calibration
    or a finite spread), in place; returns the rows."""
    complete = [r for r in rows if r.get("status") == "complete"]
    if calibration is None or not complete:
        for r in complete:
            r.update(expected_error_mm=np.nan, expected_error_upper_mm=np.nan)
        return rows
    expected, upper = calibration.predict([_number(r.get(FEATURE)) for r in complete])
    for r, e, u in zip(complete, expected, upper, strict=True):
        r.update(expected_error_mm=float(e), expected_error_upper_mm=float(u))
    return rows
