"""``equiqc calibrate``: fit a model's expected-error mapping on synthetic cohorts from several generator families.

Calibrating a model (``equiqc calibrate --model M --out calib.json``):

1. build a calibration cohort with known maps from a template (default: MultiPropReg's own atlas for
   ``multipropreg``, nilearn's MNI152 2009 at 2 mm otherwise; ``--template``/``--template-mask`` for another):
   ``pairs_per_family`` pairs of each generator family (:data:`equiqc.pipeline.synthetic.FAMILIES`: affine +
   velocity, large affine, B-spline free-form, regional), each at a strength drawn in ``strength`` (default
   0.25-2.5x the family's listed ranges, past what a model recovers) and with its own intensity changes
   (contrast curve, bias field, noise, blur: :func:`equiqc.pipeline.synthetic.wide_intensity`), no failures;
   every other pair on a second anatomy where one exists here (:func:`equiqc.workflows.demo.other_anatomy`:
   MultiPropReg's adult atlas on the MNI template's grid, or the MNI template for MultiPropReg's atlas);
2. run it through the normal pipeline (``equiqc run``: same cluster, options and stores) in a work folder;
3. fit the feature mapping on every complete pair, its conformal offset from out-of-family residuals
   (:func:`equiqc.pipeline.calibration.fit_feature_calibration`);
4. measure the bound's coverage with each family left out of the whole procedure
   (:func:`equiqc.pipeline.calibration.leave_one_family_out`);
5. fit the per-voxel error model (``error_mm``) on voxels sampled from every pair's stores and judge it with each
   family left out against ``std_mm`` and the no-perturbation baselines
   (:func:`equiqc.pipeline.voxel_error.fit_and_judge`);
6. write everything, with the families, their ranges and the intensity changes, into the calibration file
   (:mod:`equiqc.storage.calibration`).

Which calibration a run uses is :mod:`equiqc.workflows.calibration_choice` (this module runs a cohort, so the
run imports the choice from there, not from here).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np

import equiqc
from equiqc.pipeline.backends.registry import model_atlas
from equiqc.pipeline.calibration import FEATURES, TARGET, feature_matrix, fit_feature_calibration, leave_one_family_out
from equiqc.pipeline.voxel_error import fit_and_judge
from equiqc.storage.calibration import write_calibration
from equiqc.workflows.calibration_choice import NO_CALIBRATION
from equiqc.workflows.config import ConfigError, RunConfig
from equiqc.workflows.logs import LOGGER

__all__ = ["calibrate", "calibration_rows", "voxel_samples"]

INTENSITY = ("gamma in exp(+-0.4), multiplicative bias field sd 0.1 on a 4^3 grid, noise 0-4 % of the maximum, "
             "Gaussian blur sigma 0-1 voxel")


def calibration_rows(rows: list[dict], families: dict[str, str]) -> list[dict]:
    """The complete rows with a finite true error and every feature, each with its ``family``."""
    usable = [dict(r, family=families[r["pair_id"]]) for r in rows if r.get("status") == "complete"
              and r["pair_id"] in families and np.isfinite(float(r.get(TARGET) or np.nan))]
    x = feature_matrix(usable)
    return [r for r, ok in zip(usable, np.isfinite(x).all(axis=1), strict=True) if ok]


VOXELS_PER_PAIR = 60_000  # region voxels per calibration pair read for the voxel model (a random subset)


def voxel_samples(work: str | Path, rows: list[dict], seed: int = 0) -> list[dict]:
    """Per calibration pair (rows with ``family``): features (:func:`equiqc.pipeline.voxel_error.voxel_features`)
    and true error (mm) of up to :data:`VOXELS_PER_PAIR` random voxels of its evaluation region, read from the
    work folder's stores; ``[]`` when the results hold no prediction (``--store minimal``)."""
    from equiqc.pipeline.scores import map_error_mm
    from equiqc.pipeline.voxel_error import VOXEL_FEATURES
    from equiqc.storage.cohort import read_pair
    from equiqc.storage.results import ResultNotFound, read_array
    from equiqc.storage.run_folder import cohort_store, results_store
    from equiqc.workflows.tasks import pair_voxel_features

    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        stored = read_pair(cohort_store(work), r["pair_id"])
        try:
            phi, _ = read_array(results_store(work), r["pair_id"], "prediction_map")
        except ResultNotFound:
            return []
        std, _ = read_array(results_store(work), r["pair_id"], "std_mm")
        maps, region = pair_voxel_features(std, phi, stored)
        error = map_error_mm(np.asarray(phi, np.float64), np.asarray(stored["ground_truth"].data, np.float64),
                             stored["source"].affine)
        index = np.flatnonzero(region)
        index = rng.choice(index, min(VOXELS_PER_PAIR, index.size), replace=False)
        out.append({"pair_id": r["pair_id"], "family": r["family"],
                    "x": maps.reshape(len(VOXEL_FEATURES), -1)[:, index].T, "e": error.ravel()[index]})
    return out


def calibrate(config: RunConfig, out: str | Path, work: str | Path, pairs_per_family: int = 14,
              families: tuple[str, ...] | None = None, template: str | Path | None = None,
              template_mask: str | Path | None = None, coverage: float = 0.9,
              strength: tuple[float, float] = (0.25, 2.5), handle=None, argv: list[str] | None = None) -> dict:
    """Build, run and fit a calibration cohort (see module docstring); write the calibration file ``out``."""
    from equiqc.pipeline.synthetic import FAMILIES
    from equiqc.workflows.demo import ANATOMIES, build_family_cohort, family_plan, other_anatomy_available
    from equiqc.workflows.provenance import probe_model
    from equiqc.workflows.run import run_cohort

    families = tuple(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or len(set(families)) < 3:
        raise ConfigError(f"--families {' '.join(families)}: give at least three of {', '.join(FAMILIES)} (the bound "
                          "is calibrated on residuals from families its fit has not seen, and its coverage is "
                          "measured on each family left out of a fit on the others)")
    if not 0 <= strength[0] <= strength[1]:
        raise ConfigError(f"--strength {strength[0]} {strength[1]}: give 0 <= LO <= HI")
    if pairs_per_family * (len(families) - 1) < len(FEATURES) + 3:
        raise ConfigError(f"--pairs-per-family {pairs_per_family}: with {len(families)} families the fits with one "
                          f"family left out would have too few pairs for {len(FEATURES)} features; give at least "
                          f"{-(-(len(FEATURES) + 3) // (len(families) - 1))}")
    for path in (template, template_mask):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"template file not found: {path}")
    config = dataclasses.replace(config, calibration=NO_CALIBRATION)
    config = dataclasses.replace(config, weights_sha256=probe_model(config).weights_sha256)
    atlas = Path(template) if template else model_atlas(config.model)
    seed = config.seed
    anatomies = ("template", "other") if other_anatomy_available(atlas) else ("template",)
    if len(anatomies) == 1:
        LOGGER.info(f"calibration cohort on one anatomy ({atlas}): a second needs the MNI template with "
                    "equiqc[multipropreg] installed, or MultiPropReg's atlas")
    plan = family_plan(families, pairs_per_family, strength, seed, anatomies=anatomies)
    cohort = build_family_cohort(work, plan, seed=seed, atlas=atlas, mask=template_mask)
    LOGGER.info(f"calibration cohort: {len(plan)} pairs ({pairs_per_family} per family) from {atlas} -> "
                f"{cohort.manifest}")
    summary = run_cohort(cohort.manifest, work, config, handle=handle, argv=argv)
    family_of = {pid: item["family"] for pid, item in zip(cohort.truth, plan, strict=True)}
    rows = calibration_rows(summary.rows, family_of)
    x, error = feature_matrix(rows), np.array([r[TARGET] for r in rows], float)
    groups = np.array([r["family"] for r in rows])
    try:
        calibration = fit_feature_calibration(x, error, groups, coverage)
    except ValueError as exc:
        raise ConfigError(f"calibration cohort in {work}: {exc} ({len(summary.failed)} pairs failed: see "
                          f"{Path(work) / 'report.parquet'})") from exc
    voxels = voxel_samples(work, rows, seed)
    voxel_model, voxel_table = fit_and_judge(voxels, seed=seed) if voxels else (None, [])
    if voxel_model is None:
        LOGGER.info("no voxel model: the calibration cohort's results hold no prediction (--store minimal)")
    record = {"setting": config.calibration_setting(), "calibration": calibration.to_dict(),
              "leave_one_family_out": leave_one_family_out(x, error, groups, coverage),
              "voxel_model": voxel_model.to_dict() if voxel_model else None,
              "voxel_leave_one_family_out": voxel_table,
              "pairs": [{"pair_id": r["pair_id"], "family": r["family"], "true_error_mm": float(e)}
                        for r, e in zip(rows, error, strict=True)],
              "cohort": {"template": str(atlas), "template_mask": str(template_mask) if template_mask else None,
                         "families": {f: FAMILIES[f].ranges for f in families}, "intensity": INTENSITY,
                         "anatomies": {a: ANATOMIES[a] for a in anatomies},
                         "pairs_per_family": pairs_per_family, "pairs": len(plan), "complete": len(rows),
                         "seed": seed, "strength": list(strength), "work": str(Path(work).resolve())},
              "equiqc_version": equiqc.__version__, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "command_line": " ".join(argv) if argv else None}
    write_calibration(out, record)
    return record
