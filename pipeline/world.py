"""Grids in world space with numpy only (no torch): ITK's physical space (LPS mm, shared by ANTs, ITK, SimpleITK
and 3D Slicer) against equiqc's RAS+ voxel-to-world affines, and grids' world bounding boxes.

Maps here follow DESIGN's convention (``(3, X, Y, Z)``, source voxel indices of each target voxel); an ITK
displacement field ``D`` on the target grid has ``x + D(x)`` the source point of target point ``x``, in LPS mm.
Kept free of torch so that storage code (ingest, transform files, exports) imports no torch through them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_geometry(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """``(origin, spacing, direction)`` of ITK (LPS mm; direction row-major 3x3, unit columns) of a grid whose
    voxel-to-RAS affine is ``affine`` (the grid's own array axis order)."""
    lps = LPS_FROM_RAS @ np.asarray(affine, np.float64)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / spacing
    return tuple(lps[:, 3]), tuple(spacing), tuple(direction.ravel())


def _grid_mm(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """RAS world coordinates (mm) ``(3, *shape)`` of every voxel of a grid."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine[:3, :3], grid) + affine[:3, 3].reshape(3, 1, 1, 1)


def displacement_lps(psi: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """A map ``(3, X, Y, Z)`` (RAS+ source voxels, on the RAS+ target grid) -> ITK displacement ``(3, X, Y, Z)``:
    LPS mm, ``D(x)`` with ``x + D(x)`` the source point of target point ``x``, still on the target grid."""
    src = np.einsum("ij,j...->i...", source_affine[:3, :3], psi) + source_affine[:3, 3].reshape(3, 1, 1, 1)
    return np.einsum("ij,j...->i...", LPS_FROM_RAS, src - _grid_mm(target_affine, psi.shape[1:]))


def map_from_displacement_lps(field: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`displacement_lps`: an ITK displacement ``(3, X, Y, Z)`` (LPS mm, on the target grid
    of voxel-to-RAS ``target_affine``) -> the map ``(3, X, Y, Z)`` in source voxel indices (``source_affine``)."""
    ras = _grid_mm(target_affine, field.shape[1:]) + np.einsum("ij,j...->i...", LPS_FROM_RAS, field)
    inv = np.linalg.inv(np.asarray(source_affine, np.float64))
    return np.einsum("ij,j...->i...", inv[:3, :3], ras) + inv[:3, 3].reshape(3, 1, 1, 1)


def world_box(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The world bounding box ``(low, high)`` (mm, the affine's world frame) of a grid's voxels, edges included
    (voxel corners at -0.5 and n - 0.5)."""
    a = np.asarray(affine, np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(len(shape), -1)
    world = a[:3, :3] @ corners + a[:3, 3:]
    return world.min(1), world.max(1)


def box_coverage(box: tuple[np.ndarray, np.ndarray], of: tuple[np.ndarray, np.ndarray]) -> float:
    """The fraction of the box ``of``'s volume inside ``box`` (both ``(low, high)`` in one world frame)."""
    (b0, b1), (o0, o1) = box, of
    inside = np.clip(np.minimum(b1, o1) - np.maximum(b0, o0), 0, None).prod()
    return float(inside / max((o1 - o0).prod(), 1e-9))
