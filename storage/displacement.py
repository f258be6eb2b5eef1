"""A registration map as a displacement field that ITK, ANTs (``antsApplyTransforms``) and 3D Slicer apply.

ITK's convention (which ANTs and Slicer share): a displacement field transform lives on the **fixed** image's
grid (here the target: its own file grid, origin, spacing and direction); at each physical point ``x`` of
that grid it holds ``D(x)`` such that ``x + D(x)`` is the corresponding point of the **moving** image (the
source). Points and vectors are in ITK's physical space, **LPS** millimetres. Resampling the moving image
through the transform onto the fixed grid (``antsApplyTransforms -i source -r target -t field``,
``SimpleITK.Resample(source, target, transform)``) gives the registered source.

equiqc's maps are ``psi`` (source voxel indices of each target voxel, RAS+ arrays, :mod:`equiqc.pipeline`
conventions), so ``D_LPS(y) = F (A_src psi(y) - A_tgt y)`` with ``F = diag(-1, -1, 1)`` and the RAS+ affines
``A``; the array is then put back in the target file's own axis order.

Written with SimpleITK (a maintained library; equiqc writes no ITK convention by hand):

* ``.nii`` / ``.nii.gz``: a 5D NIfTI ``(X, Y, Z, 1, 3)``, intent ``vector`` (1007), LPS vectors: what ANTs
  writes for its own warps and reads back;
* ``.h5``: an ITK transform file (``DisplacementFieldTransform``), which Slicer and ITK read as a transform.

SimpleITK is the optional extra ``equiqc[itk]`` (in ``test``): exporting a map without it is one clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equiqc.errors import UserError, require
from equiqc.pipeline.world import itk_geometry

FORMATS = (".nii", ".nii.gz", ".h5")


class ExportError(UserError, ValueError):
    """An export that cannot be written as asked; the message says what to do."""


def _sitk():
    return require("SimpleITK", "itk", "writing a displacement field ITK/ANTs/Slicer can apply", error=ExportError)


def write_displacement_field(path: str | Path, field_lps: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``field_lps`` (``(X, Y, Z, 3)`` LPS mm, array axes of the file whose voxel-to-RAS affine is ``affine``)
    as an ITK displacement field: 5D NIfTI or ``.h5`` transform by the suffix of ``path`` (see module)."""
    path = Path(path)
    if not any(path.name.endswith(s) for s in FORMATS):
        raise ExportError(f"{path}: a displacement field is written as {', '.join(FORMATS)}")
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(field_lps, (2, 1, 0, 3)), np.float64),
                                   isVector=True)  # SimpleITK arrays are (z, y, x, component)
    origin, spacing, direction = itk_geometry(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".h5":
        sitk.WriteTransform(sitk.DisplacementFieldTransform(image), str(path))
    else:
        sitk.WriteImage(image, str(path))
    return path
