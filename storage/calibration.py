"""Calibration files: JSON records of a fitted spread -> error mapping, and the ones shipped with equiqc.

A calibration file (``equiqc calibrate --out calib.json``) holds:

* ``format``: :data:`FORMAT`;
* ``setting``: what the mapping is valid for (model, weights checksum, model options, method, perturbation,
  K, draws): a run uses a calibration only when its own setting is identical
  (:func:`equiqc.workflows.config.RunConfig.calibration_setting`);
* ``calibration``: the fitted mapping (:func:`equiqc.pipeline.calibration.calibration_from_dict`: features and
  weights, conformal offset, feature ranges; in format 1 the spread-only jackknife+ mapping);
* ``leave_one_family_out`` (format 2): per generator family, the bound's coverage when the whole procedure is
  fitted on the other families (``n``, ``covered``, ``coverage``, a 95 % Clopper-Pearson interval, pairs in
  range, the mean absolute error of ``expected_error_mm``); ``held_out`` (format 1): the same on random
  held-out pairs;
* ``cohort``: how the calibration cohort was built (template, families and their ranges, strengths, intensity
  changes, pairs, seed), the equiqc version and the creation time.

Shipped calibrations live in the package (``equiqc/pipeline/backends/calibrations/<model>.json``), one per
built-in model at its default setting.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from equiqc.errors import UserError
from equiqc.storage.atomic import write_text_atomic

FORMAT = "equiqc-calibration/2"  # written; /1 (the spread-only mapping, no families) is still read
READABLE = ("equiqc-calibration/1", FORMAT)
REQUIRED = ("format", "setting", "calibration")


class CalibrationError(UserError, ValueError):
    """A calibration file that cannot be used; the message names the file and what to do."""


def write_calibration(path: str | Path, record: dict) -> Path:
    """Write a calibration record (see module docstring) as JSON, atomically."""
    return write_text_atomic(path, json.dumps({"format": FORMAT, **record}, indent=1) + "\n")


def read_calibration(path: str | Path) -> dict:
    """Read and check a calibration file; CalibrationError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path} (make one with `equiqc calibrate`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
        raise CalibrationError(f"{path}: not an equiqc calibration (needs keys {', '.join(REQUIRED)}; "
                               "make one with `equiqc calibrate`)")
    if record["format"] not in READABLE:
        raise CalibrationError(f"{path}: calibration format {record['format']!r}; this equiqc reads "
                               f"{' and '.join(map(repr, READABLE))} (re-run `equiqc calibrate`)")
    return record


def shipped_calibration_path(model: str) -> Path | None:
    """The calibration shipped for built-in model ``model`` (``default``, ``multipropreg``), or None."""
    if not model.replace("-", "").isalnum():
        return None
    path = Path(str(resources.files("equiqc.pipeline.backends") / "calibrations" / f"{model}.json"))
    return path if path.is_file() else None
