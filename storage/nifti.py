"""Reading NIfTI volumes into DESIGN's array convention, and writing them back in their own orientation.

Volumes are reoriented to the closest canonical RAS+ orientation (``nibabel.as_closest_canonical``): a
permutation/flip of array axes, no resampling. The original affine and orientation are kept so that
results can be written back onto the original grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from equiqc.errors import UserError

__all__ = ["Volume", "VolumeError", "load_volume", "save_volume", "save_on_original_grid"]


class VolumeError(UserError, ValueError):
    """A volume that cannot be used, with a message naming the file and what to do."""


@dataclass
class Volume:
    """A 3D volume in closest-canonical RAS+ array order.

    data: ``(X, Y, Z)`` array, axes R, A, S. affine: its voxel-to-world (mm) 4x4. original_affine and
    original_shape: the file's own grid, orientation: the file's axis codes (e.g. ``('L', 'P', 'S')``).
    """

    data: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, ...]
    orientation: tuple[str, ...]
    header: dict | None = None  # the file's NIfTI header fields outputs copy (header_fields); None: not NIfTI

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def load_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Load a ``.nii``/``.nii.gz`` file as a RAS+ :class:`Volume`; a 4D file must hold a single volume."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found; check the path (relative paths resolve against the manifest)")
    try:
        img = nib.load(str(path))
        if 0 in img.shape:
            raise VolumeError(f"{path}: a zero-length axis (shape {img.shape}); the file holds no voxels")
        if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
            raise VolumeError(f"{path}: singular or non-finite affine; fix the file's header (qform/sform)")
        orientation = tuple(nib.aff2axcodes(img.affine))
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume (or 4D with one volume), got shape {data.shape}")
    # reorientation may leave negative strides (flipped axes): make the array contiguous for torch and zarr
    return Volume(np.ascontiguousarray(data, dtype=dtype), canonical.affine.astype(np.float64),
                  img.affine.astype(np.float64), tuple(int(n) for n in img.shape[:3]), orientation,
                  header_fields(img.header))


def header_fields(header) -> dict | None:
    """What an output on this file's grid copies from its NIfTI header: sform and qform codes, spatial unit."""
    if not isinstance(header, nib.Nifti1Header):  # NIfTI-2 headers derive from it
        return None
    return {"sform_code": int(header["sform_code"]), "qform_code": int(header["qform_code"]),
            "xyz_units": header.get_xyzt_units()[0]}


def save_like_header(path: str | Path, data: np.ndarray, affine: np.ndarray, fields: dict | None) -> Path:
    """Write ``data`` on the grid ``affine`` as NIfTI with the sform/qform codes and spatial unit of ``fields``
    (:func:`header_fields` of the file the grid came from; None: nibabel's defaults, sform code 2)."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    if fields:
        img.set_sform(affine, code=fields["sform_code"])
        img.set_qform(affine, code=fields["qform_code"])
        img.header.set_xyzt_units(xyz=fields["xyz_units"] if fields["xyz_units"] != "unknown" else "mm")
    else:
        img.header.set_xyzt_units(xyz="mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return Path(path)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a 3D (or 3D + channels) array with its voxel-to-world affine as NIfTI."""
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), str(path))


RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def to_original_orientation(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """RAS+ array (spatial axes first) -> the array order of the file whose affine is ``original_affine``: the
    inverse of :func:`load_volume`'s reorientation (a permutation and flips, no resampling)."""
    return apply_orientation(data, ornt_transform(RAS, io_orientation(original_affine)))


def save_on_original_grid(path: str | Path, data: np.ndarray, grid: Volume) -> Path:
    """Write a RAS+ array (spatial axes first, components last) on the original file grid of ``grid`` (a loaded
    :class:`Volume`), with that file's affine and header fields: it overlays the file voxel for voxel."""
    return save_like_header(path, to_original_orientation(data, grid.original_affine), grid.original_affine,
                            grid.header)
