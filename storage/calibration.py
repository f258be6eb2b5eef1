"""Calibration files: JSON records of a fitted spread -> error mapping, and the ones shipped with equiqc.

A calibration file (``equiqc calibrate --out calib.json``) holds:

* ``format``: :data:`FORMAT`;
* ``setting``: what the mapping is valid for (model, weights checksum, model options, method, perturbation,
  K, draws): a run uses a calibration only when its own setting is identical
  (:func:`equiqc.workflows.config.RunConfig.calibration_setting`);
* ``calibration``: the fitted mapping (:class:`equiqc.pipeline.calibration.Calibration`, mm);
* ``held_out``: its coverage measured on held-out pairs of the calibration cohort (``n``, ``covered``,
  ``coverage``, a 95 % Clopper-Pearson interval, the mean absolute error of ``expected_error_mm``);
* ``cohort``: how the calibration cohort was built (template, pairs, seed, strength range), the equiqc version
  and the creation time.

Shipped calibrations live in the package (``equiqc/pipeline/backends/calibrations/<model>.json``), one per
built-in model at its default setting.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from equiqc.errors import UserError
from equiqc.storage.atomic import write_text_atomic

FORMAT = "equiqc-calibration/1"
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
    if record["format"] != FORMAT:
        raise CalibrationError(f"{path}: calibration format {record['format']!r}; this equiqc reads {FORMAT!r} "
                               "(re-run `equiqc calibrate`)")
    return record


def shipped_calibration_path(model: str) -> Path | None:
    """The calibration shipped for built-in model ``model`` (``default``, ``multipropreg``), or None."""
    if not model.replace("-", "").isalnum():
        return None
    path = Path(str(resources.files("equiqc.pipeline.backends") / "calibrations" / f"{model}.json"))
    return path if path.is_file() else None
