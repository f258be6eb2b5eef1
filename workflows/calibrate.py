"""``equiqc calibrate``, and the choice of the calibration a run uses.

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

A run's calibration (:func:`choose_calibration`): ``--calibration FILE`` (its setting must equal the run's, else
one error before any work), else the calibration shipped for the model when its setting is the run's, else
none: the expected-error columns stay empty and the report says why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import equiqc
from equiqc.pipeline.calibration import FEATURE, TARGET, Calibration, coverage_interval, fit_calibration
from equiqc.storage.calibration import read_calibration, shipped_calibration_path, write_calibration
from equiqc.storage.results import differing_keys
from equiqc.workflows.config import ConfigError, RunConfig
from equiqc.workflows.logs import LOGGER

NO_CALIBRATION = "none"


@dataclass(frozen=True)
class CalibrationChoice:
    """The calibration a run uses (or None), where it came from, and one line saying so for the report."""

    calibration: Calibration | None
    source: str | None
    summary: str

    def to_record(self) -> dict:
        """What run.json keeps, so ``equiqc report`` applies the same mapping without the file."""
        return {"source": self.source, "summary": self.summary,
                "calibration": self.calibration.to_dict() if self.calibration else None}

    @classmethod
    def from_record(cls, record: dict) -> CalibrationChoice:
        mapping = record.get("calibration")
        return cls(Calibration.from_dict(mapping) if mapping else None, record.get("source"), record["summary"])


def _chosen(record: dict, source: str) -> CalibrationChoice:
    """The choice of a calibration file's mapping, with the line report.html shows about it."""
    held = record.get("held_out") or {}
    cal = record["calibration"]
    coverage = (f"; held-out coverage {held['covered']}/{held['n']}" if held.get("n") else "")
    return CalibrationChoice(Calibration.from_dict(cal), source,
                             f"{source}: expected_error_upper_mm is a {cal['coverage']:.0%} upper bound (jackknife+, "
                             f"{len(cal['loo'])} calibration pairs{coverage})")


def choose_calibration(config: RunConfig) -> CalibrationChoice:
    """The run's calibration (see module docstring). ``config`` must carry the weights' checksum (set by the model
    probe). ConfigError when a given file does not match the run's setting."""
    setting = config.calibration_setting()
    if config.calibration == NO_CALIBRATION:
        return CalibrationChoice(None, None, "none: switched off (calibration: none)")
    if config.calibration:
        record = read_calibration(config.calibration)
        diff = sorted(differing_keys(record["setting"], setting))
        if diff:
            raise ConfigError(f"--calibration {config.calibration}: made for another setting (differs in: "
                              f"{', '.join(diff)}); calibrate this setting with `equiqc calibrate` and the run's "
                              "options, or leave --calibration out")
        return _chosen(record, str(Path(config.calibration).resolve()))
    shipped = shipped_calibration_path(config.model)
    if shipped is None:
        return CalibrationChoice(None, None, f"none: no calibration ships for model {config.model!r}; make one with "
                                 "`equiqc calibrate` and pass --calibration (expected-error columns are empty)")
    record = read_calibration(shipped)
    diff = sorted(differing_keys(record["setting"], setting))
    if diff:
        return CalibrationChoice(None, None, f"none: the calibration shipped for {config.model!r} is for another "
                                 f"setting (this run differs in: {', '.join(diff)}); make one with `equiqc "
                                 "calibrate` and pass --calibration (expected-error columns are empty)")
    return _chosen(record, f"shipped:{config.model}")


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
