"""The calibration a run uses (:func:`choose_calibration`): ``--calibration FILE`` (its setting must equal the run's,
else one error before any work), else the calibration shipped for the model when its setting is the run's, else
none: the expected-error columns stay empty and the report says why. (``equiqc calibrate``, which makes calibration
files by running a cohort, is :mod:`equiqc.workflows.calibrate`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from equiqc.pipeline.calibration import Calibration, FeatureCalibration, calibration_from_dict
from equiqc.pipeline.voxel_error import VoxelErrorModel
from equiqc.storage.calibration import read_calibration, shipped_calibration_path
from equiqc.storage.results import differing_keys
from equiqc.workflows.config import ConfigError, RunConfig

NO_CALIBRATION = "none"


@dataclass(frozen=True)
class CalibrationChoice:
    """The calibration a run uses (or None), where it came from, one line saying so for the report, and its
    per-voxel error model (``error_mm``; None when the calibration has none)."""

    calibration: Calibration | FeatureCalibration | None
    source: str | None
    summary: str
    voxel_model: VoxelErrorModel | None = None

    def to_record(self) -> dict:
        """What run.json keeps, so ``equiqc report`` applies the same mapping without the file."""
        return {"source": self.source, "summary": self.summary,
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "voxel_model": self.voxel_model.to_dict() if self.voxel_model else None}

    @classmethod
    def from_record(cls, record: dict) -> CalibrationChoice:
        mapping, voxel = record.get("calibration"), record.get("voxel_model")
        return cls(calibration_from_dict(mapping) if mapping else None, record.get("source"), record["summary"],
                   VoxelErrorModel.from_dict(voxel) if voxel else None)


def _chosen(record: dict, source: str) -> CalibrationChoice:
    """The choice of a calibration file's mapping, with the line report.html shows about it."""
    calibration = calibration_from_dict(record["calibration"])
    held = record.get("held_out") or {}
    lofo = record.get("leave_one_family_out") or {}
    coverage = (f"; held-out coverage {held['covered']}/{held['n']}" if held.get("n") else "")
    if lofo:
        coverage = "; coverage with each family left out: " + ", ".join(
            f"{family} {v['covered']}/{v['n']}" for family, v in lofo.items())
    voxel = record.get("voxel_model")
    return CalibrationChoice(calibration, source, f"{source}: expected_error_upper_mm is a "
                             f"{calibration.describe()}{coverage}" + ("; error_mm per voxel" if voxel else ""),
                             VoxelErrorModel.from_dict(voxel) if voxel else None)


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
