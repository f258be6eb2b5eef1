"""A registration a pipeline already made (an ITK/ANTs transform file) as a dense map on the pair's target grid.

The manifest column ``transform`` names one file per pair, in ITK's convention (which ANTs, fMRIPrep, sMRIPrep,
QSIPrep and Slicer share): the transform maps points of the **fixed** image (the target) to the **moving** image
(the source), in LPS millimetres, i.e. what ``antsApplyTransforms -i source -r target -t FILE`` applies. fMRIPrep's
``sub-X_from-T1w_to-<space>_mode-image_xfm.h5`` is such a file for the pair (``desc-preproc_T1w``, template).
Accepted:

* ``.h5`` / ``.hdf5``: an ITK transform file, composite ones included (an affine then a displacement field);
* ``.mat`` / ``.txt`` / ``.tfm``: an ITK affine (ANTs' ``0GenericAffine.mat``, ITK text transforms);
* ``.nii`` / ``.nii.gz``: a displacement field (ANTs' ``1Warp.nii.gz``, ``equiqc export``'s fields: 5D, intent
  vector, LPS mm).

Read with SimpleITK (extra ``equiqc[itk]``): the transform is evaluated at every voxel of the RAS+ target grid
(``TransformToDisplacementField``) and converted to equiqc's map (source voxel indices,
:func:`~equiqc.pipeline.world.map_from_displacement_lps`). A file that cannot be read, a displacement field
that does not cover the target's field of view, or a transform that sends almost none of the target into the
source image (the inverse transform, another pair's) raises :class:`~equiqc.storage.nifti.VolumeError`, which
makes it that pair's failure with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equiqc.errors import require
from equiqc.pipeline.world import LPS_FROM_RAS, box_coverage, itk_geometry, map_from_displacement_lps, world_box
from equiqc.storage.nifti import Volume, VolumeError

__all__ = ["read_transform_map", "SUFFIXES"]

SUFFIXES = (".h5", ".hdf5", ".mat", ".txt", ".tfm", ".nii", ".nii.gz")
# a transform must send at least this fraction of the target grid into the source image (voxel centres)
MIN_INSIDE_FRACTION = 0.5
# a displacement field must cover at least this fraction of the target's field of view (ITK reads zero outside)
MIN_FIELD_COVERAGE = 0.9


def _sitk():
    return require("SimpleITK", "itk", "reading a transform file (manifest column transform)", error=VolumeError)


def _read(sitk, path: Path, target: Volume):
    """The file as a SimpleITK transform (a displacement field checked to cover ``target``'s field of view)."""
    if path.name.endswith((".nii", ".nii.gz")):
        image = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
            raise VolumeError(f"transform {path}: a displacement field needs 3 components per voxel of a 3D grid "
                              f"(got {image.GetNumberOfComponentsPerPixel()} on {image.GetDimension()}D)")
        lps = np.eye(4)  # the field's voxel-to-LPS affine, from ITK's geometry; LPS -> RAS for equiqc's boxes
        lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
        lps[:3, 3] = image.GetOrigin()
        ras = np.diag([*np.diag(LPS_FROM_RAS), 1.0]) @ lps
        covered = box_coverage(world_box(ras, image.GetSize()), world_box(target.affine, target.data.shape))
        if covered < MIN_FIELD_COVERAGE:
            raise VolumeError(f"transform {path}: the displacement field covers {100 * covered:.0f} % of the target's "
                              "field of view; it must be a field on the target (template) space")
        return sitk.DisplacementFieldTransform(image)
    return sitk.ReadTransform(str(path))


def read_transform_map(path: str | Path, source: Volume, target: Volume) -> np.ndarray:
    """The transform file at ``path`` as a map ``(3, X, Y, Z)`` on ``target``'s RAS+ grid, in ``source``'s RAS+
    voxel indices (float32); raises :class:`VolumeError` naming the file and what is wrong (see the module)."""
    path = Path(path)
    if not path.name.lower().endswith(SUFFIXES):
        raise VolumeError(f"transform {path}: not a transform file ({', '.join(SUFFIXES)})")
    sitk = _sitk()
    origin, spacing, direction = itk_geometry(target.affine)
    shape = tuple(int(n) for n in target.data.shape)
    try:
        transform = _read(sitk, path, target)
        field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, shape, origin, spacing,
                                                  direction)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"transform {path}: cannot be read as an ITK/ANTs transform ({first})") from None
    lps = np.moveaxis(np.transpose(sitk.GetArrayFromImage(field), (2, 1, 0, 3)), -1, 0)  # (3, X, Y, Z)
    psi = map_from_displacement_lps(lps, source.affine, target.affine)
    if not np.isfinite(psi).all():
        raise VolumeError(f"transform {path}: non-finite coordinates")
    inside = np.ones(shape, bool)
    for d, n in enumerate(source.data.shape):
        inside &= (psi[d] >= -0.5) & (psi[d] <= n - 0.5)
    if inside.mean() < MIN_INSIDE_FRACTION:
        raise VolumeError(f"transform {path}: maps only {100 * inside.mean():.0f} % of the target into the source "
                          "image; give the transform from the source to the target (ITK's fixed = target, the "
                          "file antsApplyTransforms -i source -r target applies), not its inverse or another pair's")
    return psi.astype(np.float32)
