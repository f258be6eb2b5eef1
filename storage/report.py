"""The Parquet report: one row per manifest pair, and a per-subject table (worst pair per subject).

Schema of ``report.parquet`` (column: pandas dtype — meaning):

==========================  ========  =================================================================
subject_id                  string    manifest subject
pair_id                     string    manifest pair id
status                      string    ``complete`` or ``failed``
error                       string    why a failed pair failed (null when complete)
risk_score                  float64   log2(p95 spread / cohort median), in [-8, 8]; NaN for failed pairs
                                      (equiqc.pipeline.decision); higher = worse
flagged                     bool      at least one flag reason
flag_reasons                string    comma-separated reasons (equiqc.pipeline.decision.REASONS), "" if none
cohort_percentile           float64   percentile (0-100) of the pair's p95 spread among complete pairs
rating                      string    a person's rating (include / exclude / unsure), null if none
expected_error_mm           float64   calibrated expected mean error over the region (null: no calibration)
expected_error_upper_mm     float64   its upper bound of stated coverage (null: no calibration)
uncertainty_mean_mm         float64   mean of std_mm over the evaluation region (target mask, else FOV)
uncertainty_median_mm       float64   median of std_mm over the region
uncertainty_p95_mm          float64   95th percentile of std_mm over the region
frac_above_1mm              float64   fraction of region voxels with std_mm > 1 mm
frac_above_2mm              float64   fraction of region voxels with std_mm > 2 mm
folding_fraction            float64   fraction of region voxels where the prediction's Jacobian det <= 0
fov_loss_fraction           float64   fraction of region voxels the prediction maps outside the source image
similarity_ncc              float64   correlation of the registered source with the target over the region
similarity_lncc             float64   mean local correlation (9 mm windows) of the same: the residual mismatch
deformation_mean_mm         float64   mean world displacement (mm) of the prediction over the region
nonlinear_mean_mm           float64   mean distance (mm) of that displacement from its affine fit
log_jacobian_sd             float64   standard deviation of the prediction's log Jacobian determinant
calibration_in_range        boolean   the pair's calibration features lie within the calibration data's range
                                      (null: no calibration); outside it the bound is widened (docs/calibration.md)
n_samples                   int64     samples per voxel requested (K x draws, +1 with the unperturbed)
model                       string    backend name
method                      string    ``equivariance`` or ``mc-dropout``
perturbation                string    perturbation family
seed                        int64     run seed
runtime_s                   float64   wall time of the pair's estimation
crash_file                  string    for a failed pair: DIR-relative path of its error and traceback
true_error_mean_mm          float64   mean error of the unperturbed prediction vs ground truth (else null)
tta_error_mean_mm           float64   same for the mean composed map (else null)
transform_deviation_mean_mm float64   a given transform (manifest column transform): mean distance (mm) over the
                                      region from the perturbed registrations' mean map (else null)
transform_deviation_p95_mm  float64   its 95th percentile (reason ``deviation`` above ``deviation_mm``)
==========================  ========  =================================================================

Extra columns (e.g. per-structure ``uncertainty_mean_mm_<label>``) are kept after these. Both files carry
the run's provenance and configuration in their key-value metadata (``equiqc.provenance``,
``equiqc.config``; JSON). Files are written
to a temporary name in the same folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from equiqc.storage.atomic import atomic_path, write_text_atomic
from equiqc.storage.run_folder import NotARunFolder

__all__ = ["read_report", "read_metadata", "write_report", "SCHEMA"]

META_PREFIX = "equiqc."

SCHEMA: dict[str, str] = {
    "subject_id": "string", "pair_id": "string", "status": "string", "error": "string",
    "risk_score": "float64", "flagged": "bool", "flag_reasons": "string", "cohort_percentile": "float64",
    "rating": "string", "expected_error_mm": "float64", "expected_error_upper_mm": "float64",
    "uncertainty_mean_mm": "float64",
    "uncertainty_median_mm": "float64", "uncertainty_p95_mm": "float64", "frac_above_1mm": "float64",
    "frac_above_2mm": "float64", "folding_fraction": "float64", "fov_loss_fraction": "float64",
    "similarity_ncc": "float64", "similarity_lncc": "float64", "deformation_mean_mm": "float64",
    "nonlinear_mean_mm": "float64", "log_jacobian_sd": "float64", "calibration_in_range": "boolean",
    "n_samples": "Int64", "model": "string",
    "method": "string", "perturbation": "string", "seed": "Int64", "runtime_s": "float64", "crash_file": "string",
    "true_error_mean_mm": "float64", "tta_error_mean_mm": "float64",
    "transform_deviation_mean_mm": "float64", "transform_deviation_p95_mm": "float64",
}


def build_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with the schema's columns first, in order and with their dtypes."""
    frame = pd.DataFrame([{**r, "flag_reasons": ",".join(r["flag_reasons"]) if isinstance(r.get("flag_reasons"), list)
                           else r.get("flag_reasons")} for r in rows])
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


def write_parquet_atomic(frame: pd.DataFrame, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``frame`` to ``path`` through a temporary file in the same folder and an atomic rename.

    ``metadata`` (JSON-serialisable) goes into the file's key-value metadata, one key ``equiqc.<name>`` per
    entry, beside pandas' own; :func:`read_metadata` reads it back."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {f"{META_PREFIX}{k}".encode(): json.dumps(v, default=str).encode() for k, v in (metadata or {}).items()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_crash_file(out_dir: str | Path, pair_id: str, error: str, traceback: str | None) -> str:
    """``DIR/crash/<pair_id>.txt`` with a failed pair's error and full traceback; returns its path relative to
    ``DIR`` (what the report row links)."""
    path = Path(out_dir) / "crash" / f"{pair_id}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"pair: {pair_id}\nerror: {error}\n\n{traceback or '(no traceback: the input was refused)'}\n")
    return str(path.relative_to(out_dir))


PAIR_LOGS = "logs"


def write_pair_log(out_dir: str | Path, pair_id: str, text: str) -> Path:
    """``DIR/logs/<pair_id>.log``: what a model printed while it registered the pair (ANTs' console output),
    replaced by each computation of the pair, atomically."""
    return write_text_atomic(Path(out_dir) / PAIR_LOGS / f"{pair_id}.log", text)


def read_metadata(path: str | Path) -> dict:
    """The ``equiqc.*`` key-value metadata of a Parquet file written here, keys without the prefix."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode()[len(META_PREFIX):]: json.loads(v) for k, v in meta.items()
            if k.decode().startswith(META_PREFIX)}


REPORT = "report.parquet"


def read_report(out_dir: str | Path) -> pd.DataFrame:
    """A run folder's ``report.parquet`` (one row per pair, the schema above; its provenance:
    :func:`read_metadata`)."""
    path = Path(out_dir) / REPORT
    if not path.is_file():
        raise NotARunFolder(f"{out_dir} has no {REPORT} (run `equiqc run` or `equiqc report` on it first)")
    return pd.read_parquet(path)


def write_report(rows: list[dict], out_dir: str | Path, metadata: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.parquet`` and ``subjects.parquet`` in ``out_dir`` (both carrying ``metadata``, e.g. the
    run's provenance, see :func:`read_metadata`); returns both paths."""
    frame = build_frame(rows)
    out_dir = Path(out_dir)
    return (write_parquet_atomic(frame, out_dir / REPORT, metadata),
            write_parquet_atomic(subject_table(frame), out_dir / "subjects.parquet", metadata))
