"""Calibration: from what a run measures on a pair to its expected registration error (mm) and an upper bound.

Pure numpy/scipy/scikit-learn on per-pair summaries; reading and writing calibration files is
:mod:`equiqc.storage.calibration`, building the calibration cohorts is :mod:`equiqc.workflows.calibrate`.

Two mappings; a calibration file holds one, :func:`calibration_from_dict` reads either.

**Feature calibration** (:class:`FeatureCalibration`, made by ``equiqc calibrate`` since equiqc 0.x; all
distances in mm over the pair's evaluation region):

* features (:data:`FEATURES`, each oriented so that more means a worse registration): the spread's mean and
  95th percentile (log), the residual mismatch ``1 - similarity_lncc`` (local correlation of the registered
  source with the target), the predicted deformation's size and nonlinear part (log) and the spread of its log
  Jacobian: all from what a run computes anyway, no extra model cost;
* ``y = log(true_error_mean_mm) = a + w . x + e``: least squares with every weight ``w >= 0``
  (scikit-learn's ``LinearRegression(positive=True)``): a worse feature never predicts less error, so the fit
  extrapolates sanely beyond the calibration cohort; ``expected_error_mm = exp(a + w . x) * smearing`` (Duan);
* the upper bound ``exp(a + w . x + q)``: ``q`` comes from **out-of-family residuals**: each calibration pair's
  residual under the fit made without its generator family (its group); per family, their split-conformal
  quantile (the ``ceil(coverage (n_f + 1))``-th smallest of the family's ``n_f``), and ``q`` the largest of
  those. Every residual comes from a family the fit had not seen, so the bound is calibrated for a shift of the
  kind one family is from the others, and it covers each calibration family at the stated rate: a new cohort is
  covered when its residuals are no worse than the worst calibration family's (an assumption, measured: the file
  reports the bound's coverage on each family left out of the whole procedure). The pooled quantile of the same
  residuals (one ``q`` for all families) was measured too and covered only 10 of 14 pairs of the B-spline family
  when it was left out (docs/calibration.md);
* the calibration data's feature ranges: a pair with a feature outside them (beyond :data:`RANGE_SLACK` of
  the range) is ``in_range = False``; its features below the range are raised to its minimum (the bound never
  falls below what the calibration saw), those above it extend the fitted line, and its conformal offset grows
  by its own size (``q + |q|``: doubled, or raised to 0 when the fit over-predicted every family): a wider
  bound, stated, for a pair unlike every calibration pair.

The conformal step (a sort) is written here: the bound must be a few numbers in a JSON file applied at run
time without the fitting library, and the maintained conformal libraries (MAPIE, crepes) offer neither
family-fold residuals for a one-sided bound nor a model that serialises to that.

**Spread calibration** (:class:`Calibration`, the earlier method, still read from older files such as the
shipped ``multipropreg`` and ``ants`` ones):

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
RANGE_SLACK = 0.05  # a feature within 5 % of the calibration range beyond its ends is still in range


def in_range(x: np.ndarray, lo, hi) -> np.ndarray:
    """Whether values lie in ``[lo, hi]`` widened by :data:`RANGE_SLACK` of its width at each end (elementwise)."""
    slack = RANGE_SLACK * np.maximum(np.subtract(hi, lo), 1e-9)
    return (x >= np.subtract(lo, slack)) & (x <= np.add(hi, slack))


def _log_mm(floor: float):
    return lambda v: np.log(np.maximum(v, 0.0) + floor)


# feature name -> (report column, transform): every one oriented so that a larger value is a worse registration
FEATURES: dict[str, tuple[str, object]] = {
    "log_spread_mean": ("uncertainty_mean_mm", _log_mm(0.1)),
    "log_spread_p95": ("uncertainty_p95_mm", _log_mm(0.1)),
    "mismatch": ("similarity_lncc", lambda v: 1.0 - v),
    "log_deformation": ("deformation_mean_mm", _log_mm(1.0)),
    "log_nonlinear": ("nonlinear_mean_mm", _log_mm(0.1)),
    "log_jacobian_sd": ("log_jacobian_sd", lambda v: v),
}
# Not a feature: fov_loss_fraction. The calibration families lose almost no field of view (at most 0.07 % of the
# region in the default model's cohort), so a weight fitted on them extrapolates wildly (72.8 per unit of
# fraction when it was one: 5 % of the region lost would have multiplied the expected error by 37); the
# ``fov`` reason decides on it instead (equiqc.pipeline.decision).


def feature_matrix(rows: list[dict], names=tuple(FEATURES)) -> np.ndarray:
    """``(pairs, features)`` of :data:`FEATURES` ``names`` from report rows (NaN where a column is missing)."""
    columns = []
    for name in names:
        key, transform = FEATURES[name]
        columns.append(transform(np.array([_number(r.get(key)) for r in rows], dtype=np.float64)))
    return np.stack(columns, axis=1) if columns else np.zeros((len(rows), 0))


def _positive_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """``(intercept, weights >= 0)`` of least squares ``y = a + w . x`` (scikit-learn)."""
    from sklearn.linear_model import LinearRegression

    fit = LinearRegression(positive=True).fit(x, y)
    return float(fit.intercept_), np.asarray(fit.coef_, dtype=np.float64)


def conformal_rank(coverage: float, n: int) -> int:
    """The rank ``ceil(coverage (n + 1))`` (1-based) of the split-conformal quantile of ``n`` scores."""
    return math.ceil(coverage * (n + 1) - 1e-9)


@dataclass(frozen=True)
class FeatureCalibration:
    """A fitted feature mapping (see module docstring): log-scale ``intercept`` and ``weights`` over ``features``,
    ``smearing``, the conformal log-offset ``offset``, and each feature's calibration ``ranges`` (lo, hi)."""

    features: tuple[str, ...]
    intercept: float
    weights: tuple[float, ...]
    smearing: float
    offset: float
    coverage: float
    ranges: tuple[tuple[float, float], ...]
    n: int

    def predict_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(expected_error_mm, expected_error_upper_mm, in_range)`` for a feature matrix (NaN, False where a
        feature is not finite)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        lo, hi = np.array(self.ranges, dtype=np.float64).T
        ok = np.isfinite(x).all(axis=1)
        inside = ok & in_range(x, lo, hi).all(axis=1)
        line = self.intercept + np.maximum(np.nan_to_num(x), lo) @ np.asarray(self.weights)
        expected = np.exp(line) * self.smearing
        upper = np.exp(line + self.offset + np.where(inside, 0.0, abs(self.offset)))
        return (np.where(ok, expected, np.nan), np.where(ok, np.maximum(upper, expected), np.nan), inside)

    def predict_rows(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.predict_features(feature_matrix(rows, self.features))

    def describe(self) -> str:
        return (f"{self.coverage:.0%} upper bound (features {', '.join(self.features)}; conformal on out-of-family "
                f"residuals, {self.n} calibration pairs)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(features=list(self.features), weights=list(self.weights), ranges=[list(r) for r in self.ranges])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureCalibration:
        unknown = [f for f in d["features"] if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown calibration features {unknown}; this equiqc knows {', '.join(FEATURES)}")
        return cls(tuple(d["features"]), float(d["intercept"]), tuple(float(w) for w in d["weights"]),
                   float(d["smearing"]), float(d["offset"]), float(d["coverage"]),
                   tuple((float(a), float(b)) for a, b in d["ranges"]), int(d["n"]))


def out_of_group_residuals(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each pair's residual ``y - f(x)`` under the positive fit made without its group."""
    residuals = np.empty(len(y))
    for g in np.unique(groups):
        held = groups == g
        a, w = _positive_fit(x[~held], y[~held])
        residuals[held] = y[held] - (a + x[held] @ w)
    return residuals


def family_quantile(residuals: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of one family's out-of-family residuals: the ``ceil(coverage (n + 1))``-th
    smallest, the largest when there are fewer than that many."""
    ordered = np.sort(residuals)
    return float(ordered[min(conformal_rank(coverage, len(ordered)), len(ordered)) - 1])


def fit_feature_calibration(x: np.ndarray, error_mm: np.ndarray, groups: np.ndarray, coverage: float = 0.9,
                            features=tuple(FEATURES)) -> FeatureCalibration:
    """Fit the feature mapping on calibration pairs (see module docstring): feature matrix ``x`` (columns
    ``features``), true mean errors (mm, > 0), each pair's group (its generator family; at least two groups).

    Raises ValueError when pairs or groups are too few or not usable."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage {coverage} must be between 0 and 1")
    x, e, groups = np.asarray(x, np.float64), np.asarray(error_mm, np.float64), np.asarray(groups)
    ok = np.isfinite(x).all(axis=1) & np.isfinite(e) & (e > 0)
    x, e, groups = x[ok], e[ok], groups[ok]
    if len(np.unique(groups)) < 2:
        raise ValueError(f"{len(np.unique(groups))} generator family among the usable pairs; the out-of-family "
                         "bound needs at least two")
    if conformal_rank(coverage, len(e)) > len(e) or len(e) < x.shape[1] + 3:
        raise ValueError(f"{len(e)} usable calibration pairs for {x.shape[1]} features at {coverage:.0%}: too few")
    y = np.log(e)
    a, w = _positive_fit(x, y)
    residuals = out_of_group_residuals(x, y, groups)
    offset = max(family_quantile(residuals[groups == g], coverage) for g in np.unique(groups))
    return FeatureCalibration(tuple(features), a, tuple(float(v) for v in w),
                              float(np.mean(np.exp(y - (a + x @ w)))), offset, coverage,
                              tuple((float(lo), float(hi)) for lo, hi in zip(x.min(0), x.max(0), strict=True)), len(e))


def leave_one_family_out(x: np.ndarray, error_mm: np.ndarray, groups: np.ndarray, coverage: float = 0.9,
                         features=tuple(FEATURES)) -> dict[str, dict]:
    """The whole procedure's coverage under shift: per family, :func:`fit_feature_calibration` on the other
    families (at least two of them), applied to the left-out one: ``n``, ``covered``, ``coverage``, a 95 %
    Clopper-Pearson interval, the mean absolute error of the expected value (mm), pairs in range."""
    x, e, groups = np.asarray(x, np.float64), np.asarray(error_mm, np.float64), np.asarray(groups)
    out = {}
    for g in np.unique(groups):
        held = groups == g
        if len(np.unique(groups[~held])) < 2:
            continue
        cal = fit_feature_calibration(x[~held], e[~held], groups[~held], coverage, features)
        expected, upper, inside = cal.predict_features(x[held])
        covered = int((e[held] <= upper).sum())
        low, high = coverage_interval(covered, int(held.sum()))
        out[str(g)] = {"n": int(held.sum()), "covered": covered, "coverage": covered / int(held.sum()),
                       "coverage_ci95": [low, high], "in_range": int(inside.sum()),
                       "mean_abs_error_of_expected_mm": float(np.mean(np.abs(expected - e[held])))}
    return out


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

    def predict_rows(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(expected, upper, in_range)`` of report rows: in range when the spread lies in the calibration's."""
        spread = np.array([_number(r.get(FEATURE)) for r in rows], dtype=np.float64)
        expected, upper = self.predict(spread)
        return expected, upper, np.isfinite(spread) & in_range(spread, *self.feature_range_mm)

    def describe(self) -> str:
        return f"{self.coverage:.0%} upper bound (jackknife+ on the spread, {self.n} calibration pairs)"

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


def calibration_from_dict(d: dict) -> Calibration | FeatureCalibration:
    """The mapping of a calibration file's ``calibration`` record: a feature calibration, or the earlier spread one."""
    return FeatureCalibration.from_dict(d) if "features" in d else Calibration.from_dict(d)


def apply_calibration(rows: list[dict], calibration: Calibration | FeatureCalibration | None) -> list[dict]:
    """Set ``expected_error_mm``, ``expected_error_upper_mm`` and ``calibration_in_range`` on every complete row
    (NaN / None without a calibration; NaN where a feature is not finite), in place; returns the rows."""
    complete = [r for r in rows if r.get("status") == "complete"]
    if calibration is None or not complete:
        for r in complete:
            r.update(expected_error_mm=np.nan, expected_error_upper_mm=np.nan, calibration_in_range=None)
        return rows
    expected, upper, inside = calibration.predict_rows(complete)
    for r, e, u, i in zip(complete, expected, upper, inside, strict=True):
        r.update(expected_error_mm=float(e), expected_error_upper_mm=float(u), calibration_in_range=bool(i))
    return rows
