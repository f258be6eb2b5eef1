"""Result arrays -> NIfTI on the target's ORIGINAL grid, orientation and header (overlays in any viewer), and
maps -> displacement fields ITK, ANTs and Slicer apply.

Results live on the RAS+-reoriented target grid; ``as_closest_canonical`` only permutes and flips axes,
so the inverse permutation/flip puts every voxel back where the file had it, and the file's own affine
applies unchanged. The written header copies the target file's sform/qform codes and spatial units
(recorded at ingest, :mod:`equiqc.storage.cohort`). Scalar arrays become 3D images; arrays with a leading
component dimension (the covariance) become 4D with the components last.

Maps (``mean_map``, ``prediction_map``) become ITK displacement fields on the target's grid, LPS mm
(:mod:`equiqc.storage.displacement`): a 5D ``.nii.gz`` (``antsApplyTransforms -t``) or, with ``.h5``, an ITK
transform file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equiqc.pipeline.world import displacement_lps
from equiqc.storage.cohort import read_pair
from equiqc.storage.displacement import write_displacement_field
from equiqc.storage.nifti import save_like_header, to_original_orientation
from equiqc.storage.results import read_array

MAPS = ("mean_map", "prediction_map")


def export_array(results_root: str | Path, cohort_root: str | Path, pair_id: str, name: str,
                 out_path: str | Path) -> Path:
    """Write result array ``name`` of ``pair_id`` on the target file's original grid: NIfTI with the target's
    header for volumes; an ITK displacement field (``.nii.gz`` 5D or ``.h5``) for maps."""
    data, _ = read_array(results_root, pair_id, name)
    stored = read_pair(cohort_root, pair_id, ("source", "target"))
    target = stored["target"]
    original_affine = np.asarray(target.attrs["original_affine"])
    if name in MAPS:
        data = displacement_lps(data, stored["source"].affine, target.affine)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
    out = to_original_orientation(data, original_affine)
    if tuple(out.shape[:3]) != tuple(target.attrs["original_shape"]):
        raise RuntimeError(f"{pair_id}/{name}: reoriented shape {out.shape[:3]} does not match the target file's "
                           f"{tuple(target.attrs['original_shape'])}")
    if name in MAPS:
        return write_displacement_field(out_path, out, original_affine)
    return save_like_header(out_path, out.astype(np.float32) if out.dtype.kind == "f" else out, original_affine,
                            target.attrs.get("header"))
