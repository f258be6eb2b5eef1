"""Dense transformations on voxel grids (2D and 3D).

Conventions (see DESIGN.md):

* Arrays are ``(batch, channel, *spatial)``; spatial axes are in array order (after reorientation to the
  closest canonical RAS+ orientation, done by ``storage``). Nothing here transposes axes.
* A *map* ``phi`` of shape ``(B, D, *target_shape)`` is a dense transformation from a target grid into a
  source image: channel ``d`` holds the coordinate along array axis ``d`` of the source, in voxel index
  units (0 = centre of the first voxel). Pull-back: ``warp(source, phi)`` is the source resampled onto the
  target grid.
* A *displacement* is ``map - identity_grid``.
* Homogeneous matrices are ``(D+1, D+1)`` (or batched ``(B, D+1, D+1)``) acting on column vectors of
  coordinates in array-axis order. A NIfTI-style voxel-to-world affine (mm) is such a matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def spatial_dims(x: Tensor) -> int:
    """Number of spatial dimensions of a ``(B, C, *spatial)`` tensor (2 or 3)."""
    d = x.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected a (batch, channel, *spatial) tensor with 2 or 3 spatial axes, got {tuple(x.shape)}")
    return d


def identity_grid(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """Identity map of shape ``(1, D, *shape)``: channel ``d`` holds the voxel index along axis ``d``."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def map_to_displacement(phi: Tensor) -> Tensor:
    """Displacement ``phi - id`` (voxel units of the image the map points into)."""
    return phi - identity_grid(phi.shape[2:], phi.dtype, phi.device)


def displacement_to_map(u: Tensor) -> Tensor:
    """Map ``id + u`` from a displacement (voxel units)."""
    return u + identity_grid(u.shape[2:], u.dtype, u.device)


def _to_grid_sample(phi: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel-index map -> ``grid_sample`` grid: [-1, 1] units (align_corners=True), reversed axis order."""
    coords = []
    for d, n in enumerate(shape):
        c = phi[:, d]
        coords.append(2.0 * c / (n - 1) - 1.0 if n > 1 else torch.zeros_like(c))
    return torch.stack(coords[::-1], dim=-1)


def warp(image: Tensor, phi: Tensor, mode: str = "linear", padding: str = "zeros") -> Tensor:
    """Resample ``image`` (B or 1, C, *source_shape) at the voxel coordinates in ``phi`` (B, D, *target_shape).

    ``mode``: ``"linear"`` (bi/trilinear, for intensities and maps) or ``"nearest"`` (labels).
    ``padding``: ``"zeros"`` or ``"border"`` for samples outside the source grid.
    Returns ``(B, C, *target_shape)`` in ``image``'s dtype.
    """
    d = spatial_dims(image)
    if phi.shape[1] != d:
        raise ValueError(f"map has {phi.shape[1]} channels but the image has {d} spatial axes")
    if image.shape[0] == 1 and phi.shape[0] > 1:
        image = image.expand(phi.shape[0], *image.shape[1:])
    gs_mode = {"linear": "bilinear", "nearest": "nearest"}[mode]
    grid = _to_grid_sample(phi.to(image.dtype), image.shape[2:])
    if image.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool):
        if mode != "nearest":
            raise ValueError("integer images (labels) can only be warped with mode='nearest'")
        out = F.grid_sample(image.double(), grid.double(), mode=gs_mode, padding_mode=padding, align_corners=True)
        return out.round().to(image.dtype)
    return F.grid_sample(image, grid, mode=gs_mode, padding_mode=padding, align_corners=True)


def sample_map(phi: Tensor, coords: Tensor) -> Tensor:
    """Evaluate the dense map ``phi`` (B or 1, D, *grid) at voxel coordinates ``coords`` (B, D, *out).

    Linear interpolation of the displacement, extrapolated as constant beyond the grid, so a map that is
    affine inside the grid is reproduced exactly inside and continued smoothly outside.
    """
    u = map_to_displacement(phi)
    return coords + warp(u, coords, mode="linear", padding="border")


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """``outer o inner``: first ``inner`` (target grid -> grid of ``outer``), then ``outer``."""
    return sample_map(outer, inner)


# ----------------------------------------------------------------------------------------------------------
# Affine helpers
# ----------------------------------------------------------------------------------------------------------


def as_matrix(affine: np.ndarray | Tensor | None, d: int, dtype=torch.float64, device=None) -> Tensor:
    """Homogeneous ``(D+1, D+1)`` tensor from a numpy/torch affine; ``None`` means identity."""
    if affine is None:
        return torch.eye(d + 1, dtype=dtype, device=device)
    m = torch.as_tensor(np.asarray(affine) if not isinstance(affine, Tensor) else affine)
    m = m.to(dtype=dtype, device=device)
    if m.shape[-2:] != (d + 1, d + 1):
        raise ValueError(f"expected a ({d + 1}, {d + 1}) affine for {d}D data, got {tuple(m.shape)}")
    return m


def matrix_from_parts(linear: Tensor, translation: Tensor) -> Tensor:
    """Homogeneous matrices ``(..., D+1, D+1)`` from linear parts ``(..., D, D)`` and translations ``(..., D)``."""
    d = linear.shape[-1]
    out = torch.zeros(*linear.shape[:-2], d + 1, d + 1, dtype=linear.dtype, device=linear.device)
    out[..., :d, :d] = linear
    out[..., :d, d] = translation
    out[..., d, d] = 1.0
    return out


def invert_affine(matrix: Tensor) -> Tensor:
    """Inverse of homogeneous matrices ``(..., D+1, D+1)``."""
    return torch.linalg.inv(matrix)


def apply_affine(matrix: Tensor, phi: Tensor) -> Tensor:
    """Apply homogeneous matrices to every coordinate of a map, exactly (no interpolation).

    ``matrix``: ``(D+1, D+1)`` or ``(B, D+1, D+1)``; ``phi``: ``(B, D, *spatial)``. Returns ``matrix @ phi``
    per voxel, computed in the dtype of ``phi``.
    """
    d = phi.shape[1]
    m = matrix.to(dtype=phi.dtype, device=phi.device)
    if m.dim() == 2:
        m = m[None]
    lin, trans = m[:, :d, :d], m[:, :d, d]
    flat = phi.reshape(phi.shape[0], d, -1)
    out = torch.einsum("bij,bjn->bin", lin, flat) + trans[:, :, None]
    return out.reshape(phi.shape)


def affine_map(matrix: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Dense map ``(B, D, *shape)`` of homogeneous voxel-space matrices ``(B, D+1, D+1)`` on a grid."""
    if matrix.dim() == 2:
        matrix = matrix[None]
    grid = identity_grid(shape, torch.float64, matrix.device).expand(matrix.shape[0], -1, *shape)
    return apply_affine(matrix.double(), grid).to(dtype)


def voxel_to_mm(phi: Tensor, affine: Tensor) -> Tensor:
    """Voxel-index coordinates -> world coordinates (mm) with a voxel-to-world affine."""
    return apply_affine(affine, phi)


def mm_to_voxel(x: Tensor, affine: Tensor) -> Tensor:
    """World coordinates (mm) -> voxel-index coordinates with a voxel-to-world affine."""
    return apply_affine(invert_affine(affine.double()), x)


def voxel_matrix_from_world(world: Tensor, affine: Tensor) -> Tensor:
    """Express world-space (mm) homogeneous matrices in voxel coordinates of a grid: ``A^-1 @ W @ A``."""
    a = affine.to(world.dtype)
    return invert_affine(a) @ world @ a


def grid_centre_mm(shape: Sequence[int], affine: Tensor) -> Tensor:
    """World coordinates (mm) of the centre of a grid, ``affine @ (shape - 1) / 2``."""
    c = torch.tensor([(n - 1) / 2 for n in shape] + [1.0], dtype=affine.dtype, device=affine.device)
    return (affine @ c)[:-1]


# ----------------------------------------------------------------------------------------------------------
# Map diagnostics
# ----------------------------------------------------------------------------------------------------------


def inside_grid(phi: Tensor, shape: Sequence[int], tol: float = 1e-4) -> Tensor:
    """Boolean ``(B, *spatial)``: the map's coordinate lies within ``[0, n-1]`` on every axis of ``shape``."""
    ok = torch.ones(phi.shape[0], *phi.shape[2:], dtype=torch.bool, device=phi.device)
    for d, n in enumerate(shape):
        c = phi[:, d]
        ok &= (c >= -tol) & (c <= n - 1 + tol)
    return ok


def jacobian_determinant(phi: Tensor) -> Tensor:
    """Determinant of the spatial derivative of a map, ``(B, *spatial)``, central differences, voxel units.

    A value <= 0 marks folding. The sign is invariant to the (positive-determinant) RAS+ affines.
    """
    d = spatial_dims(phi)
    grads = [torch.gradient(phi[:, i], dim=tuple(range(1, d + 1))) for i in range(d)]
    jac = torch.stack([torch.stack(g, dim=-1) for g in grads], dim=-2)  # (B, *spatial, D, D)
    return torch.linalg.det(jac.double()).to(phi.dtype)


def scaling_and_squaring(velocity: Tensor, steps: int = 7) -> Tensor:
    """Exponentiate a stationary velocity field (voxel units, ``(B, D, *shape)``) into a displacement.

    ``exp(v)`` is approximated by ``2**steps`` self-compositions of ``v / 2**steps``. The inverse of the
    resulting map is ``exp(-v)``.
    """
    u = velocity / (2**steps)
    for _ in range(steps):
        u = u + warp(u, displacement_to_map(u), mode="linear", padding="border")
    return u
