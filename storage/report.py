"""The Parquet report: one row per manifest pair, and a per-subject table (worst pair per subject).

Schema of ``report.parquet`` (column: pandas dtype — meaning):

==========================  ========  =================================================================
subject_id                  string    manifest subject
pair_id                     string    manifest pair id
status                      string    ``complete`` or ``failed``
error                       string    why a failed pair failed (null when complete)
risk_score                  float64   cohort-relative risk (robust z-score, see workflows); higher = worse
flagged                     bool      risk or absolute uncertainty above its threshold
uncertainty_mean_mm         float64   mean of std_mm over the evaluation region (target mask, else FOV)
uncertainty_median_mm       float64   median of std_mm over the region
uncertainty_p95_mm          float64   95th percentile of std_mm over the region
frac_above_1mm              float64   fraction of region voxels with std_mm > 1 mm
frac_above_2mm              float64   fraction of region voxels with std_mm > 2 mm
folding_fraction            float64   fraction of region voxels where the prediction's Jacobian det <= 0
n_samples                   int64     samples per voxel requested (K x draws, +1 with the unperturbed)
model                       string    backend name
method                      string    ``equivariance`` or ``mc-dropout``
perturbation                string    perturbation family
seed                        int64     run seed
runtime_s                   float64   wall time of the pair's estimation
true_error_mean_mm          float64   mean error of the unperturbed prediction vs ground truth (else null)
tta_error_mean_mm           float64   same for the mean composed map (else null)
==========================  ========  =================================================================

Extra columns (e.g. per-structure ``uncertainty_mean_mm_<label>``) are kept after these. Files are written
to a temporary name in the same folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

SCHEMA: dict[str, str] = {
    "subject_id": "string", "pair_id": "string", "status": "string", "error": "string",
    "risk_score": "float64", "flagged": "bool", "uncertainty_mean_mm": "float64",
    "uncertainty_median_mm": "float64", "uncertainty_p95_mm": "float64", "frac_above_1mm": "float64",
    "frac_above_2mm": "float64", "folding_fraction": "float64", "n_samples": "Int64", "model": "string",
    "method": "string", "perturbation": "string", "seed": "Int64", "runtime_s": "float64",
    "true_error_mean_mm": "float64", "tta_error_mean_mm": "float64",
}


def build_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with the schema's columns first, in order and with their dtypes."""
    frame = pd.DataFrame(rows)
    for col, dtype in SCHEMA.items():
        if col not in frame:
            frame[col] = False if dtype == "bool" else None
    extra = [c for c in frame.columns if c not in SCHEMA]
    frame = frame[list(SCHEMA) + extra]
    frame["flagged"] = frame["flagged"].fillna(False)
    return frame.astype(SCHEMA)


def subject_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Worst pair per subject: the highest risk (failed pairs count as worst), with the subject's counts."""
    order = frame.assign(_failed=frame["status"] != "complete", _risk=frame["risk_score"].fillna(float("inf")))
    order = order.sort_values(["subject_id", "_failed", "_risk"], ascending=[True, False, False])
    worst = order.groupby("subject_id", sort=True).head(1).drop(columns=["_failed", "_risk"])
    counts = frame.groupby("subject_id").agg(n_pairs=("pair_id", "size"), n_flagged=("flagged", "sum"),
                                             n_failed=("status", lambda s: int((s != "complete").sum())))
    return worst.set_index("subject_id").join(counts).reset_index()


def write_parquet_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, engine="pyarrow", index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_report(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.parquet`` and ``subjects.parquet`` in ``out_dir``; returns both paths."""
    frame = build_frame(rows)
    out_dir = Path(out_dir)
    return (write_parquet_atomic(frame, out_dir / "report.parquet"),
            write_parquet_atomic(subject_table(frame), out_dir / "subjects.parquet"))
