"""Random spatial perturbations ``tau`` of the source image.

Every perturbation is defined in physical space (mm, degrees) about the centre of the source grid and
is applied as a map on the source grid (voxel units, DESIGN convention): ``A'_k = warp(A, tau_k)``.

Families (``PerturbationConfig.kind``):

* ``translation``: ``x -> x + t``, each component of ``t`` uniform in ``[-max_translation_mm, +]``.
* ``rigid``: rotation about the grid centre (each Euler angle uniform in ``[-max_rotation_deg, +]``, one
  angle in 2D) followed by a translation as above.
* ``affine``: rigid, plus per-axis log-scales uniform in ``[-max_log_scale, +]`` and shears uniform in
  ``[-max_shear, +]``.
* ``scale``: per-axis log-scales as in ``affine``, alone (no rotation, no translation): ``x -> S (x - c) + c``.
* ``shear``: the shears of ``affine`` (upper triangle of a unit triangular matrix), alone, about the centre.
* ``diffeomorphic``: ``exp(v)`` of a smooth stationary velocity field, drawn as Gaussian noise on a coarse
  control grid (``control_spacing_mm``), smoothed, scaled so the per-component standard deviation is
  ``velocity_std_mm``, upsampled linearly to an integration grid (:func:`integration_grid`, 4 intervals per
  control interval), integrated there by scaling and squaring; the displacement is evaluated wherever it is
  needed by linear interpolation of that grid (never built on the full source grid).

Defaults are small enough that a registration model sees inputs close to its training distribution
(a few mm, a few degrees), which is what the equivariance argument needs: the spread should reflect the
model's sensitivity, not an out-of-distribution failure caused by the perturbation itself.

Random draws come from a CPU ``torch.Generator`` (see :func:`pair_seed`), so a pair's perturbations are
the same on every device and for every batch size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from equiqc.pipeline import transforms as T
from equiqc.pipeline.perturbation_config import ALL_KINDS, KINDS, PerturbationConfig

__all__ = ["ALL_KINDS", "DenseWarp", "KINDS", "PerturbationConfig", "Perturbations", "pair_seed",
           "sample_perturbations"]

Tensor = torch.Tensor

def pair_seed(run_seed: int, pair_id: str) -> int:
    """Stable 63-bit seed from (run seed, pair id), independent of Python's hash randomisation."""
    digest = hashlib.sha256(f"{int(run_seed)}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Perturbations:
    """K perturbations of one source grid.

    ``matrices``: ``(K, D+1, D+1)`` float64 homogeneous matrices in source *voxel* coordinates (affine
    families), or ``None``. ``velocity``: ``(K, D, *coarse)`` float64 velocity on the coarse control grid in
    source voxel units (diffeomorphic family), or ``None``. Dense maps are built per batch on demand, so
    memory does not grow with K.
    """

    kind: str
    shape: tuple[int, ...]
    matrices: Tensor | None = None
    velocity: Tensor | None = None

    def __len__(self) -> int:
        return int((self.matrices if self.matrices is not None else self.velocity).shape[0])

    @property
    def is_affine(self) -> bool:
        return self.matrices is not None

    def maps(self, index: Tensor | Sequence[int], device=None, dtype=torch.float32) -> Tensor:
        """Dense maps ``tau`` ``(b, D, *shape)`` on the source grid for the selected perturbations."""
        index = torch.as_tensor(index, dtype=torch.long)
        if self.matrices is not None:
            return T.affine_map(self.matrices[index].to(device), self.shape, dtype)
        eye = torch.eye(len(self.shape) + 1, dtype=torch.float64)
        return self.dense(index, device, dtype).on_grid(eye, self.shape)

    def dense(self, index: Tensor | Sequence[int], device=None, dtype=torch.float32) -> DenseWarp:
        """Diffeomorphic family: the selected ``tau`` as a :class:`DenseWarp`, integrated on the coarse grid of
        :func:`integration_grid` and never built on the full source grid."""
        if self.velocity is None:
            raise ValueError(f"the {self.kind} family is affine: use its matrices")
        index = torch.as_tensor(index, dtype=torch.long)
        v = self.velocity[index].to(device=device, dtype=dtype)  # control grid, source voxel units
        grid = integration_grid(self.shape, v.shape[2:])
        v = F.interpolate(v, size=grid, mode="bilinear" if len(grid) == 2 else "trilinear", align_corners=True)
        to_grid = torch.tensor([(m - 1) / max(n - 1, 1) for m, n in zip(grid, self.shape, strict=True)],
                               dtype=dtype, device=v.device).view(1, -1, *([1] * len(grid)))  # source -> grid voxels
        return DenseWarp(T.scaling_and_squaring(v * to_grid) / to_grid, self.shape)

    def compose_back(self, index: Tensor | Sequence[int], phi_prime: Tensor, tau: DenseWarp | None = None) -> Tensor:
        """``psi = tau o phi'`` for the selected perturbations; exact for affine families.

        ``phi_prime``: ``(b, D, *target)`` predictions on the perturbed source (voxel units of the source
        grid). ``tau``: the diffeomorphic family's :meth:`dense` of these perturbations, if already built.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        if self.matrices is not None:
            return T.apply_affine(self.matrices[index].to(phi_prime.device), phi_prime)
        if tau is None:
            tau = self.dense(index, phi_prime.device, phi_prime.dtype)
        return tau(phi_prime)


@dataclass(frozen=True)
class DenseWarp:
    """A batch of ``b`` dense perturbations ``tau_b`` of a source grid of ``shape``: source voxel positions ->
    perturbed positions (source voxels), by linear interpolation of ``displacement`` ``(b, D, *coarse)``, given in
    source voxel units on a coarse grid covering the source grid's extent (first and last voxels aligned)."""

    displacement: Tensor
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.displacement.shape[0])

    def __call__(self, points: Tensor) -> Tensor:
        """``tau_b(points)`` for positions ``(b or 1, D, *out)`` in source voxels: ``(b, D, *out)``."""
        return points + T.sample_displacement(self.displacement, points, self.shape)

    def on_grid(self, matrix: Tensor, shape: Sequence[int]) -> Tensor:
        """``tau_b`` at the source positions ``matrix @ index`` of every voxel of a grid of ``shape`` (``matrix``:
        that grid's voxel -> source voxel, e.g. a network grid's): ``(b, D, *shape)``; separable interpolation
        when ``matrix`` is axis-aligned (:func:`~equiqc.pipeline.transforms.sample_map_on_grid`)."""
        return T.sample_map_on_grid(self.displacement, matrix, shape, self.shape)


# The diffeomorphic family's velocity is linear between control points, so it is integrated on a grid with
# this many intervals per control interval (not on the full source grid) and the displacement upsampled:
# measured against full-resolution integration in tests/test_perturbations.py and docs/performance.md.
INTEGRATION_SUBDIVISIONS = 4


def integration_grid(shape: Sequence[int], control: Sequence[int]) -> tuple[int, ...]:
    """Where a velocity on a ``control`` grid is integrated for a source grid of ``shape``: a grid covering the
    same extent with :data:`INTEGRATION_SUBDIVISIONS` intervals per control interval (at most ``shape``)."""
    return tuple(min(int(n), (int(c) - 1) * INTEGRATION_SUBDIVISIONS + 1) for n, c in zip(shape, control, strict=True))


def rotation_matrices(angles_rad: Tensor, d: int) -> Tensor:
    """Rotation matrices (K, D, D) from angles (K, 1) in 2D or Euler angles (K, 3) about axes 0, 1, 2 in 3D."""
    k = angles_rad.shape[0]
    if d == 2:
        c, s = torch.cos(angles_rad[:, 0]), torch.sin(angles_rad[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = torch.eye(3, dtype=angles_rad.dtype).repeat(k, 1, 1)
    for axis in range(3):
        c, s = torch.cos(angles_rad[:, axis]), torch.sin(angles_rad[:, axis])
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3, dtype=angles_rad.dtype).repeat(k, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = r @ out
    return out


def world_linear_parts(config: PerturbationConfig, k: int, d: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw K linear parts (K, D, D) and translations (K, D) in world space (mm) for an affine family."""

    def uniform(*size: int, half: float) -> Tensor:
        return (torch.rand(*size, generator=generator, dtype=torch.float64) * 2 - 1) * half

    translation = uniform(k, d, half=config.max_translation_mm)
    linear = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    if config.kind in ("none", "scale", "shear"):
        translation = torch.zeros_like(translation)
    if config.kind in ("rigid", "affine"):
        n_angles = 1 if d == 2 else 3
        linear = rotation_matrices(torch.deg2rad(uniform(k, n_angles, half=config.max_rotation_deg)), d)
    # The draws keep affine's order (scales, then shears), so its samples are unchanged by the two families.
    scale = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    if config.kind in ("affine", "scale"):
        scale = torch.diag_embed(torch.exp(uniform(k, d, half=config.max_log_scale)))
    shear = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1)
    if config.kind in ("affine", "shear"):
        iu = torch.triu_indices(d, d, offset=1)
        shear[:, iu[0], iu[1]] = uniform(k, iu.shape[1], half=config.max_shear)
    linear = linear @ shear @ scale
    return linear, translation


def sample_perturbations(
    config: PerturbationConfig,
    k: int,
    shape: Sequence[int],
    affine: Tensor | None = None,
    seed: int = 0,
) -> Perturbations:
    """Draw ``k`` perturbations for a source grid of ``shape`` with voxel-to-world ``affine`` (mm).

    Affine families: the world transform ``x -> L (x - c) + c + t`` (``c`` the grid centre in mm) is
    expressed in voxel coordinates as ``A^-1 W A``. Diffeomorphic: a velocity field in mm converted to
    voxel units with ``A``'s linear part.
    """
    shape = tuple(int(n) for n in shape)
    d = len(shape)
    a = T.as_matrix(affine, d)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if config.is_affine:
        linear, translation = world_linear_parts(config, k, d, gen)
        return Perturbations(config.kind, shape, matrices=T.about_grid_centre(linear, translation, shape, a))
    spacing = torch.linalg.norm(a[:d, :d], dim=0)  # mm per voxel along each array axis
    extent = spacing * torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    coarse = [max(3, int(math.ceil(float(e) / config.control_spacing_mm)) + 1) for e in extent]
    noise = torch.randn(k, d, *coarse, generator=gen, dtype=torch.float64)
    noise = _smooth(noise)
    std = noise.flatten(2).std(dim=2).clamp_min(1e-12).view(k, d, *([1] * d))
    v_mm = noise / std * config.velocity_std_mm
    inv_lin = torch.linalg.inv(a[:d, :d])
    v_vox = torch.einsum("ij,kj...->ki...", inv_lin, v_mm)
    return Perturbations(config.kind, shape, velocity=v_vox)


def _smooth(x: Tensor) -> Tensor:
    """Separable [1, 2, 1]/4 smoothing along every spatial axis (replicate padding)."""
    d = x.dim() - 2
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype)
    for axis in range(d):
        moved = x.movedim(2 + axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        flat = F.conv1d(F.pad(flat, (1, 1), mode="replicate"), kernel.view(1, 1, 3))
        x = flat.reshape(moved.shape).movedim(-1, 2 + axis)
    return x
