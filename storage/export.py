"""Result arrays -> NIfTI on the target's ORIGINAL grid, orientation and affine (overlays in any viewer).

Results live on the RAS+-reoriented target grid; ``as_closest_canonical`` only permutes and flips axes,
so the inverse permutation/flip puts every voxel back where the file had it, and the file's own affine
applies unchanged. Scalar arrays become 3D images; arrays with a leading component/axis dimension become
4D with the components last. Maps (``mean_map``, ``prediction_map``) are written as world-space
displacements in mm (RAS+): ``A_src @ psi(y) - A_tgt @ y``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from equiqc.storage.cohort import read_pair
from equiqc.storage.nifti import save_volume
from equiqc.storage.results import read_array

RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
MAPS = ("mean_map", "prediction_map")


def to_original_orientation(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """RAS+ array (spatial axes first) -> the array order of the file whose affine is ``original_affine``."""
    return apply_orientation(data, ornt_transform(RAS, io_orientation(original_affine)))


def map_to_world_displacement(psi: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """``(3, X, Y, Z)`` source-voxel map on the target grid -> ``(3, X, Y, Z)`` displacement in mm (RAS+)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in psi.shape[1:]], indexing="ij"))
    src_mm = np.einsum("ij,j...->i...", source_affine[:3, :3], psi) + source_affine[:3, 3, None, None, None]
    tgt_mm = np.einsum("ij,j...->i...", target_affine[:3, :3], grid) + target_affine[:3, 3, None, None, None]
    return (src_mm - tgt_mm).astype(np.float32)


def export_nifti(results_root: str | Path, cohort_root: str | Path, pair_id: str, name: str,
                 out_path: str | Path) -> Path:
    """Write result array ``name`` of ``pair_id`` as NIfTI on the target file's original grid."""
    data, attrs = read_array(results_root, pair_id, name)
    stored = read_pair(cohort_root, pair_id, ("source", "target"))
    target = stored["target"]
    if name in MAPS:
        data = map_to_world_displacement(data, stored["source"].affine, target.affine)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
    original_affine = np.asarray(target.attrs["original_affine"])
    out = to_original_orientation(data, original_affine)
    if tuple(out.shape[:3]) != tuple(target.attrs["original_shape"]):
        raise RuntimeError(f"{pair_id}/{name}: reoriented shape {out.shape[:3]} does not match the target file's "
                           f"{tuple(target.attrs['original_shape'])}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_volume(out_path, out, original_affine)
    return out_path
