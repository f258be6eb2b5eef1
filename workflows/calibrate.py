"""``equiqc calibrate``: fit a model's spread -> expected error mapping on a synthetic cohort.

Calibrating a model (``equiqc calibrate --model M --out calib.json``):

1. build a calibration cohort with known maps from a template (default: MultiPropReg's own atlas for
   ``multipropreg``, nilearn's MNI152 2009 at 2 mm otherwise; ``--template``/``--template-mask`` for another)
   with the demo's generator (:func:`equiqc.workflows.demo.build_demo_cohort`), no injected failures, each
   pair's map ranges scaled by a factor drawn in ``strength`` (default 0.25-2x the demo's: rotations up to
   8 degrees, translations up to 8 mm, scalings up to 8 %, velocities up to 4 mm);
2. run it through the normal pipeline (``equiqc run``: same cluster, options and stores) in a work folder;
3. split the complete pairs at random (seeded): ``held_out`` of them are kept aside, the rest fit the mapping
   (:func:`equiqc.pipeline.calibration.fit_calibration`);
4. measure the bound's coverage on the held-out pairs and write everything into the calibration file
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
from equiqc.pipeline.calibration import FEATURE, TARGET, Calibration, coverage_interval, fit_calibration
from equiqc.storage.calibration import write_calibration
from equiqc.workflows.calibration_choice import NO_CALIBRATION
from equiqc.workflows.config import ConfigError, RunConfig
from equiqc.workflows.logs import LOGGER


def held_out_check(calibration: Calibration, rows: list[dict]) -> dict:
    """Coverage of the upper bound (and error of the expected value) on held-out rows with a true error (mm)."""
    spread = np.array([r[FEATURE] for r in rows], float)
    error = np.array([r[TARGET] for r in rows], float)
    expected, upper = calibration.predict(spread)
    covered = int((error <= upper).sum())
    low, high = coverage_interval(covered, len(rows)) if rows else (float("nan"), float("nan"))
    return {"n": len(rows), "covered": covered, "coverage": covered / len(rows) if rows else float("nan"),
            "coverage_ci95": [low, high],
            "mean_abs_error_of_expected_mm": float(np.mean(np.abs(expected - error))) if rows else float("nan"),
            "pairs": [{"pair_id": r["pair_id"], "spread_mm": s, "true_error_mm": e, "expected_error_mm": x,
                       "expected_error_upper_mm": u}
                      for r, s, e, x, u in zip(rows, spread, error, expected, upper, strict=True)]}


def calibrate(config: RunConfig, out: str | Path, work: str | Path, pairs: int = 40,
              template: str | Path | None = None, template_mask: str | Path | None = None, coverage: float = 0.9,
              held_out: float = 0.3, strength: tuple[float, float] = (0.25, 2.0), handle=None,
              argv: list[str] | None = None) -> dict:
    """Build, run and fit a calibration cohort (see module docstring); write the calibration file ``out``."""
    from equiqc.pipeline.calibration import minimum_pairs
    from equiqc.workflows.demo import build_demo_cohort
    from equiqc.workflows.provenance import probe_model
    from equiqc.workflows.run import run_cohort

    if not 0 < held_out < 1:
        raise ConfigError(f"--held-out {held_out}: give the fraction of pairs kept aside, between 0 and 1")
    if not 0 <= strength[0] <= strength[1]:
        raise ConfigError(f"--strength {strength[0]} {strength[1]}: give 0 <= LO <= HI")
    n_fit = pairs - round(pairs * held_out)
    if n_fit < minimum_pairs(coverage) or round(pairs * held_out) < 1:
        raise ConfigError(f"--pairs {pairs} with --held-out {held_out}: {n_fit} pairs would fit the mapping; a "
                          f"{coverage:.0%} bound needs at least {minimum_pairs(coverage)} (and one held out)")
    for path in (template, template_mask):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"template file not found: {path}")
    config = dataclasses.replace(config, calibration=NO_CALIBRATION)
    config = dataclasses.replace(config, weights_sha256=probe_model(config).weights_sha256)
    atlas = Path(template) if template else "multipropreg" if config.model == "multipropreg" else "mni"
    seed = config.seed
    cohort = build_demo_cohort(work, pairs=pairs, seed=seed, failure_fraction=0.0, atlas=atlas,
                               mask=template_mask, strength=strength)
    LOGGER.info(f"calibration cohort: {pairs} pairs from {atlas} -> {cohort.manifest}")
    summary = run_cohort(cohort.manifest, work, config, handle=handle, argv=argv)
    usable = [r for r in summary.rows if r["status"] == "complete"
              and np.isfinite(r.get(FEATURE, np.nan)) and np.isfinite(r.get(TARGET, np.nan))]
    order = np.random.default_rng(seed).permutation(len(usable))
    n_test = round(len(usable) * held_out)
    test, fit = [usable[i] for i in order[:n_test]], [usable[i] for i in order[n_test:]]
    try:
        calibration = fit_calibration([r[FEATURE] for r in fit], [r[TARGET] for r in fit], coverage)
    except ValueError as exc:
        raise ConfigError(f"calibration cohort in {work}: {exc} ({len(summary.failed)} pairs failed: see "
                          f"{Path(work) / 'report.parquet'})") from exc
    record = {"setting": config.calibration_setting(), "calibration": calibration.to_dict(),
              "held_out": held_out_check(calibration, test),
              "fit_pairs": [r["pair_id"] for r in fit],
              "cohort": {"template": str(atlas), "template_mask": str(template_mask) if template_mask else None,
                         "pairs": pairs, "complete": len(usable), "seed": seed, "strength": list(strength),
                         "work": str(Path(work).resolve())},
              "equiqc_version": equiqc.__version__, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "command_line": " ".join(argv) if argv else None}
    write_calibration(out, record)
    return record
