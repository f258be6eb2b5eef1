"""A per-voxel error estimate ``error_mm``: the pair calibration's idea voxel by voxel (pure tensors and numpy).

Per voxel of the target grid (all in mm), three features, each oriented so that more means a worse registration:

* ``log_spread``: ``log(std_mm + 0.1)``, the method's spread;
* ``mismatch``: ``1 - local NCC`` of the registered source and the target (windows of about 9 mm,
  :func:`equiqc.pipeline.scores.local_ncc`): where the images still disagree after registration;
* ``log_nonlinear``: ``log(d + 0.1)``, ``d`` the distance of the predicted world displacement from its affine fit
  over the region (:func:`equiqc.pipeline.scores.nonlinear_part_mm`): where the model had to deform.

``log(error + 0.1) = a + w . x`` with every ``w >= 0`` (scikit-learn's ``LinearRegression(positive=True)``) fitted
on voxels sampled from the calibration pairs (their true error known); ``error_mm = max(exp(a + w . x) - 0.1, 0)``.
Judged leave-one-family-out against ``std_mm`` alone and the no-perturbation baselines (``mismatch`` and
``log_nonlinear`` alone) by the voxel Spearman correlation with the true error and the sparsification nAURC
(``benchmarks/voxel_error.py``, docs/validation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["VOXEL_FEATURES", "VoxelErrorModel", "voxel_features", "fit_voxel_model", "fit_and_judge"]

VOXEL_FEATURES = ("log_spread", "mismatch", "log_nonlinear")
FLOOR_MM = 0.1


def voxel_features(std_mm: np.ndarray, prediction_map: np.ndarray, source: np.ndarray, target: np.ndarray,
                   source_affine: np.ndarray, target_affine: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``(len(VOXEL_FEATURES), *target)`` feature maps (float32) of one pair (see module docstring): ``std_mm`` and
    ``region`` (bool) on the target grid, the prediction in source voxels ``(3, *target)``, the two images.
    (torch imported here: applying a fitted model, :class:`VoxelErrorModel`, needs numpy only.)"""
    import torch

    from equiqc.pipeline.scores import (
        lncc_window,
        local_ncc,
        nonlinear_part_mm,
        registered_source,
        world_displacement_mm,
    )

    phi = torch.as_tensor(np.asarray(prediction_map), dtype=torch.float32)
    flat = torch.as_tensor(np.asarray(region)).flatten().nonzero().squeeze(1)
    warped = registered_source(source, phi)
    mismatch = 1.0 - local_ncc(warped, torch.as_tensor(target, dtype=torch.float32), lncc_window(target_affine))
    disp = world_displacement_mm(phi, source_affine, target_affine)
    nonlinear = nonlinear_part_mm(disp, flat) if flat.numel() >= 4 else torch.zeros(phi.shape[1:], dtype=torch.float64)
    spread = np.log(np.maximum(np.asarray(std_mm, np.float64), 0.0) + FLOOR_MM)  # NaN stays NaN
    return np.stack([spread, mismatch.numpy(), np.log(nonlinear.numpy() + FLOOR_MM)]).astype(np.float32)


@dataclass(frozen=True)
class VoxelErrorModel:
    """``log(error + 0.1) = intercept + weights . features`` over :data:`VOXEL_FEATURES` (``features`` names the
    columns used, a subset for the baselines)."""

    features: tuple[str, ...]
    intercept: float
    weights: tuple[float, ...]

    def predict(self, maps: np.ndarray) -> np.ndarray:
        """``error_mm`` (float32, target grid) from :func:`voxel_features`' maps; NaN where a used feature is not."""
        index = [VOXEL_FEATURES.index(f) for f in self.features]
        x = np.asarray(maps, np.float64)[index]
        line = self.intercept + np.tensordot(np.asarray(self.weights), x, axes=1)
        return np.maximum(np.exp(line) - FLOOR_MM, 0.0).astype(np.float32)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "intercept": self.intercept, "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, d: dict) -> VoxelErrorModel:
        unknown = [f for f in d["features"] if f not in VOXEL_FEATURES]
        if unknown:
            raise ValueError(f"unknown voxel features {unknown}; this equiqc knows {', '.join(VOXEL_FEATURES)}")
        return cls(tuple(d["features"]), float(d["intercept"]), tuple(float(w) for w in d["weights"]))


def fit_voxel_model(x: np.ndarray, error_mm: np.ndarray, features=VOXEL_FEATURES) -> VoxelErrorModel:
    """Fit on sampled voxels: ``x`` ``(voxels, len(features))`` in the order of ``features``, true errors (mm)."""
    from sklearn.linear_model import LinearRegression

    x, e = np.asarray(x, np.float64), np.asarray(error_mm, np.float64)
    ok = np.isfinite(x).all(axis=1) & np.isfinite(e)
    fit = LinearRegression(positive=True).fit(x[ok], np.log(np.maximum(e[ok], 0.0) + FLOOR_MM))
    return VoxelErrorModel(tuple(features), float(fit.intercept_), tuple(float(w) for w in fit.coef_))


BASELINES = {"std_mm": "log_spread", "mismatch (no perturbation)": "mismatch",
             "nonlinear deformation (no perturbation)": "log_nonlinear"}


def _fit_on(pairs: list[dict], samples: int, rng: np.random.Generator) -> VoxelErrorModel:
    """:func:`fit_voxel_model` on ``samples`` random voxels of each pair (``{"x": (voxels, F), "e": (voxels,)}``)."""
    picks = [rng.choice(len(p["e"]), min(samples, len(p["e"])), replace=False) for p in pairs]
    return fit_voxel_model(np.concatenate([p["x"][i] for p, i in zip(pairs, picks, strict=True)]),
                           np.concatenate([p["e"][i] for p, i in zip(pairs, picks, strict=True)]))


def fit_and_judge(pairs: list[dict], samples: int = 4000, seed: int = 0) -> tuple[VoxelErrorModel, list[dict]]:
    """The voxel model fitted on every pair, and its leave-one-family-out judgement: per family, the model fitted
    on the other families' pairs against ``std_mm`` and the no-perturbation baselines (:data:`BASELINES`) on the
    family's pairs: median [IQR] voxel Spearman with the true error and median sparsification nAURC.

    ``pairs``: ``{"family", "x": (voxels, len(VOXEL_FEATURES)), "e": (voxels,) true error mm}`` (region voxels)."""
    from equiqc.pipeline.scores import sparsification_naurc, spearman

    rng = np.random.default_rng(seed)
    table = []
    for family in sorted({p["family"] for p in pairs}):
        held = [p for p in pairs if p["family"] == family]
        model = _fit_on([p for p in pairs if p["family"] != family], samples, rng)
        columns = {name: VOXEL_FEATURES.index(f) for name, f in BASELINES.items()}
        predictions = [{**{name: p["x"][:, i] for name, i in columns.items()}, "error_mm": model.predict(p["x"].T)}
                       for p in held]
        for name in [*columns, "error_mm"]:
            rho = [spearman(v[name], p["e"]) for v, p in zip(predictions, held, strict=True)]
            naurc = [sparsification_naurc(v[name], p["e"]) for v, p in zip(predictions, held, strict=True)]
            rho, naurc = np.array(rho, float), np.array(naurc, float)
            finite = rho[np.isfinite(rho)]  # NaN for a pair where a map or the error is constant
            table.append({"family": family, "predictor": name, "pairs": len(held),
                          "spearman_median": float(np.median(finite)) if finite.size else float("nan"),
                          "spearman_iqr": [float(v) for v in np.percentile(finite, [25, 75])] if finite.size
                          else [float("nan")] * 2,
                          "naurc_median": float(np.median(naurc[np.isfinite(naurc)])) if np.isfinite(naurc).any()
                          else float("nan")})
    return _fit_on(pairs, samples, rng), table
