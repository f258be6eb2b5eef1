"""BIDS derivatives out: the dataset description, per-pair files with entity-based names, JSON sidecars.

Layout of a derivatives folder ``OUT`` (``equiqc bids``; the run's own stores live beside them and are listed
in ``.bidsignore``)::

    OUT/dataset_description.json        DatasetType "derivative", GeneratedBy equiqc (version, model, K...)
    OUT/decisions.tsv, exclude.tsv      the decision (+ decisions.json / exclude.json column descriptions)
    OUT/report.html
    OUT/sub-XX/[ses-YY/]anat/
        <entities>_space-<target>_desc-uncertainty_stdmm.nii.gz   std_mm on the target's own grid (+ .json)
        <entities>_space-<target>_desc-uncertainty_errormm.nii.gz error_mm, the calibrated per-voxel error
                                                                   estimate, when the run made one (+ .json)
        <entities>_from-<suffix>_to-<target>_mode-image_xfm.nii.gz the checked registration, an ITK/ANTs
                                                                   displacement field (+ .json)

``<entities>`` are the source image's (``sub-01_ses-02_acq-x``); ``<target>`` is the target's space label.
Every sidecar says what the file holds, its unit, the model, the perturbation family and K.
"""

from __future__ import annotations

import json
from pathlib import Path

import equiqc
from equiqc.storage.atomic import write_text_atomic
from equiqc.storage.export import export_array
from equiqc.storage.results import ResultNotFound
from equiqc.storage.run_folder import COHORT, RESULTS, RUN_RECORD

BIDS_VERSION = "1.10.0"
OPTIONAL = ("error_mm",)  # written when the run stored it
IGNORED = (f"{COHORT}/", f"{RESULTS}/", "crash/", "logs/", RUN_RECORD, "report.parquet", "subjects.parquet",
           "equiqc.log", "manifest.tsv", "ratings.tsv", ".equiqc-locks/", "report.html")


def write_dataset_description(out: str | Path, source_dataset: str | Path, generated_by: dict) -> Path:
    """``dataset_description.json`` of the derivatives and ``.bidsignore`` for the run's own files."""
    out = Path(out)
    description = {"Name": "equiqc registration quality control", "BIDSVersion": BIDS_VERSION,
                   "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "equiqc", "Version": equiqc.__version__, **generated_by}],
                   "SourceDatasets": [{"URL": Path(source_dataset).resolve().as_uri()}]}
    write_text_atomic(out / ".bidsignore", "".join(f"{p}\n" for p in IGNORED))
    return write_text_atomic(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")


def pair_files(out: str | Path, stem: str, subject: str, session: str, space: str, suffix: str) -> dict[str, Path]:
    """Where one pair's derivative files go (see module docstring): ``{"std_mm": ..., "prediction_map": ...}``."""
    folder = Path(out) / subject / (f"ses-{session}" if session else "") / "anat"
    return {"std_mm": folder / f"{stem}_space-{space}_desc-uncertainty_stdmm.nii.gz",
            "error_mm": folder / f"{stem}_space-{space}_desc-uncertainty_errormm.nii.gz",
            "prediction_map": folder / f"{stem}_from-{suffix}_to-{space}_mode-image_xfm.nii.gz"}


def write_pair_derivatives(out: str | Path, results: str | Path, cohort: str | Path, pair_id: str,
                           files: dict[str, Path], about: dict) -> list[Path]:
    """Export a complete pair's ``std_mm``, ``error_mm`` (when stored) and prediction into ``files`` with a JSON
    sidecar each; ``about`` (model, perturbation, K, sources...) goes into every sidecar."""
    meaning = {
        "std_mm": {"Description": "Registration uncertainty: per-voxel spread (square root of the trace of the "
                                  "covariance) of the model's predictions for perturbed copies of the source, "
                                  "composed back (transformation-equivariance). Target grid and header.",
                   "Units": "mm"},
        "error_mm": {"Description": "Calibrated per-voxel estimate of the registration's error: the spread, the "
                                    "local mismatch of the registered images and the deformation's nonlinear part, "
                                    "combined by a model fitted on synthetic pairs with known maps "
                                    "(equiqc.pipeline.voxel_error). Target grid and header.", "Units": "mm"},
        "prediction_map": {"Description": "The registration checked: the model's unperturbed prediction as an ITK "
                                          "displacement field on the target grid (LPS mm; antsApplyTransforms -t, "
                                          "SimpleITK DisplacementFieldTransform).",
                           "Units": "mm", "FromFile": "source image", "ToSpace": "target"},
    }
    written = []
    for name, path in files.items():
        try:
            export_array(results, cohort, pair_id, name, path)
        except ResultNotFound:
            if name in OPTIONAL:
                continue
            raise
        sidecar = path.with_name(path.name.removesuffix(".nii.gz") + ".json")
        write_text_atomic(sidecar, json.dumps({**meaning[name], **about}, indent=2, default=str) + "\n")
        written += [path, sidecar]
    return written
