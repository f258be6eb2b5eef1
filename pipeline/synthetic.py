"""Synthetic pairs with known maps: generator families, intensity changes and injected failures (pure tensors).

A synthetic subject is a template moved by a known map: the subject image is ``template(fwd(y))`` on the
template's grid, and the true registration (subject = source -> template = target) is ``inv = fwd^-1``. Maps are
``(1, 3, *shape)`` float64 in voxel units of the template grid (RAS+ array order), as everywhere in equiqc.

**Generator families** (:data:`FAMILIES`): structurally different kinds of known maps, each scaled by a
``strength`` factor (1 = the ranges listed with the family; calibration cohorts draw it per pair, so their
magnitudes reach past what a model recovers):

* ``affine_velocity``: a random affine (rotations, translations, scalings) composed with a smooth stationary
  velocity field on a coarse 7 x 8 x 7 grid (the demo's generator);
* ``affine``: a larger random affine with shears, no nonlinear part;
* ``bspline``: a cubic B-spline free-form deformation with control spacing drawn from
  :data:`BSPLINE_SPACINGS_MM` plus a small rigid offset; its inverse by fixed-point iteration;
* ``local``: a deformation concentrated in one region (a Gaussian velocity bump of radius 8-16 mm centred at a
  random point of the region) plus a small rigid offset.

**Intensity changes** (:func:`wide_intensity`): a contrast curve (gamma), a smooth multiplicative bias field,
Gaussian noise and a resolution loss (Gaussian blur), each drawn per pair; the demo keeps its narrower
:func:`demo_intensity`.

**Injected failures** (:data:`FAILURES`): a named change of a pair that makes its registration fail, either
of the map (``extreme_deformation``: a smooth 8 mm velocity field, 4x the demo's, on top of the pair's map,
past what a model recovers; ``large_rotation``: 25-40 degrees about one axis on top of the pair's map) or of
the image (``contrast_inversion``, ``missing_slab``, ``heavy_noise``, ``other_subject``: another person's
brain, where its scanner put it, moved by the pair's map, so the true map is the intended subject's;
``corrupted``: the demo's slab plus heavy noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equiqc.pipeline import transforms as T
from equiqc.pipeline.perturbations import rotation_matrices

__all__ = ["FAMILIES", "FAILURES", "Family", "Failure", "draw_pair_map", "wide_intensity", "demo_intensity",
           "subject_map", "rigidly_moved", "fixed_point_inverse", "with_rotation", "with_velocity"]

BSPLINE_SPACINGS_MM = (15.0, 25.0, 35.0)


def _uniform(gen: torch.Generator, *shape: int) -> Tensor:
    """Uniform draws in [-1, 1) (float64)."""
    return torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1


def _rigid(shape, affine: Tensor, gen: torch.Generator, rot_deg: float, shift_mm: float,
           scale: float = 0.0, shear: float = 0.0) -> Tensor:
    """A random affine about the grid centre, voxel matrix (4 x 4): rotations up to ``rot_deg`` per axis,
    translations up to ``shift_mm``, scalings up to ``scale`` (fraction), shears up to ``shear``."""
    deg = _uniform(gen, 1, 3) * rot_deg
    lin = rotation_matrices(torch.deg2rad(deg), 3)[0] @ torch.diag(1 + _uniform(gen, 3) * scale)
    if shear:
        s = torch.eye(3, dtype=torch.float64)
        s[0, 1], s[0, 2], s[1, 2] = (_uniform(gen, 3) * shear).tolist()
        lin = lin @ s
    return T.about_grid_centre(lin, _uniform(gen, 3) * shift_mm, shape, affine)


def _with_affine(m: Tensor, fwd_u: Tensor | None, inv_u: Tensor | None, shape) -> tuple[Tensor, Tensor]:
    """``(fwd, inv)`` of ``a = m o (id + fwd_u)`` from a voxel matrix and a displacement with its inverse (voxels)."""
    if fwd_u is None:
        return T.affine_map(m, shape, torch.float64), T.affine_map(torch.linalg.inv(m), shape, torch.float64)
    fwd = T.apply_affine(m, T.displacement_to_map(fwd_u).double())
    inv = T.sample_map(T.displacement_to_map(inv_u).double(), T.affine_map(torch.linalg.inv(m), shape, torch.float64))
    return fwd, inv


def subject_map(shape, affine, gen, rot_deg=4.0, shift_mm=4.0, scale=0.04, vel_mm=2.0, axis_rot=None):
    """The ``affine_velocity`` family: ``(fwd, inv)`` for ``a = M o exp(v)`` (the demo's subjects; ``axis_rot =
    (axis, degrees)`` replaces the random rotation by one about one axis)."""
    a = torch.as_tensor(affine)
    deg = _uniform(gen, 1, 3) * rot_deg
    if axis_rot is not None:
        deg = torch.zeros(1, 3, dtype=torch.float64)
        deg[0, axis_rot[0]] = axis_rot[1]
    lin = rotation_matrices(torch.deg2rad(deg), 3)[0] @ torch.diag(1 + _uniform(gen, 3) * scale)
    m = T.about_grid_centre(lin, _uniform(gen, 3) * shift_mm, shape, a)
    spacing = torch.linalg.norm(a[:3, :3], dim=0).float()
    coarse = torch.randn(1, 3, 7, 8, 7, generator=gen) * (vel_mm / spacing).view(1, 3, 1, 1, 1)
    v = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return _with_affine(m, T.scaling_and_squaring(v), T.scaling_and_squaring(-v), shape)  # float32, as it was


def fixed_point_inverse(u: Tensor, iterations: int = 40) -> Tensor:
    """The inverse displacement ``w`` of ``id + u`` (``(1, D, *shape)``, voxels): ``w(y) = -u(y + w(y))`` iterated
    from 0; converges where ``u`` is a contraction (its voxel gradient below 1, as for the FFDs drawn here)."""
    w = torch.zeros_like(u)
    for _ in range(iterations):
        w = -T.warp(u, T.displacement_to_map(w), mode="linear", padding="border")
    return w


def _bspline_displacement(shape, affine: Tensor, gen: torch.Generator, spacing_mm: float, sd_mm: float) -> Tensor:
    """A cubic B-spline free-form displacement (voxels, ``(1, 3, *shape)``): control points every ``spacing_mm``
    over the grid (plus the spline's support beyond it), coefficients Gaussian with ``sd_mm`` per component,
    evaluated as a B-spline (scipy's ``map_coordinates``, order 3, coefficients not prefiltered)."""
    from scipy import ndimage

    voxel_mm = torch.linalg.norm(affine[:3, :3], dim=0).numpy()
    step = spacing_mm / voxel_mm  # control spacing in voxels, per axis
    n_ctrl = [int(np.ceil((n - 1) / s)) + 4 for n, s in zip(shape, step, strict=True)]
    coef = torch.randn(3, *n_ctrl, generator=gen, dtype=torch.float64).numpy() * (sd_mm / voxel_mm)[:, None, None, None]
    coords = np.stack(np.meshgrid(*[np.arange(n) / s + 1.0 for n, s in zip(shape, step, strict=True)],
                                  indexing="ij"))
    u = np.stack([ndimage.map_coordinates(c, coords, order=3, prefilter=False, mode="nearest") for c in coef])
    return torch.as_tensor(u)[None]


def _bspline(shape, affine, gen, strength: float) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(affine, dtype=torch.float64)
    spacing = BSPLINE_SPACINGS_MM[int(torch.randint(len(BSPLINE_SPACINGS_MM), (1,), generator=gen))]
    u = _bspline_displacement(shape, a, gen, spacing, 1.5 * strength)
    return _with_affine(_rigid(shape, a, gen, 1.0, 1.0), u, fixed_point_inverse(u), shape)


def _local(shape, affine, gen, strength: float, region: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(affine, dtype=torch.float64)
    voxel_mm = torch.linalg.norm(a[:3, :3], dim=0)
    inside = np.argwhere(region) if region is not None and region.any() else np.argwhere(np.ones(shape, bool))
    centre = torch.as_tensor(inside[int(torch.randint(len(inside), (1,), generator=gen))], dtype=torch.float64)
    radius_mm = 8.0 + 8.0 * float(torch.rand(1, generator=gen, dtype=torch.float64))
    direction = torch.randn(3, generator=gen, dtype=torch.float64)
    peak_vox = direction / direction.norm() * 5.0 * strength / voxel_mm
    grid = T.identity_grid(shape, torch.float64)[0]
    d2 = (((grid - centre.view(3, 1, 1, 1)) * voxel_mm.view(3, 1, 1, 1)) ** 2).sum(0)
    v = (torch.exp(-d2 / (2 * radius_mm**2)) * peak_vox.view(3, 1, 1, 1))[None]
    return _with_affine(_rigid(shape, a, gen, 1.0, 1.0), T.scaling_and_squaring(v), T.scaling_and_squaring(-v),
                        shape)


def _affine_velocity(shape, affine, gen, strength: float) -> tuple[Tensor, Tensor]:
    return subject_map(shape, affine, gen, rot_deg=4.0 * strength, shift_mm=4.0 * strength, scale=0.04 * strength,
                       vel_mm=2.0 * strength)


def _affine(shape, affine, gen, strength: float) -> tuple[Tensor, Tensor]:
    m = _rigid(shape, torch.as_tensor(affine, dtype=torch.float64), gen, 6.0 * strength, 6.0 * strength,
               0.06 * strength, 0.04 * strength)
    return _with_affine(m, None, None, shape)


@dataclass(frozen=True)
class Family:
    """A generator family of known maps: ``draw(shape, affine, gen, strength, region) -> (fwd, inv)``."""

    name: str
    ranges: str  # what strength 1 draws, in words (recorded in calibration files)
    draw: Callable[..., tuple[Tensor, Tensor]]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("affine_velocity", "rotations up to 4 deg, translations up to 4 mm, scalings up to 4 %, smooth velocity "
           "2 mm (7 x 8 x 7 control grid)", lambda s, a, g, k, region=None: _affine_velocity(s, a, g, k)),
    Family("affine", "rotations up to 6 deg, translations up to 6 mm, scalings up to 6 %, shears up to 4 %",
           lambda s, a, g, k, region=None: _affine(s, a, g, k)),
    Family("bspline", "cubic B-spline FFD, control spacing 15/25/35 mm, coefficients sd 1.5 mm; rigid 1 deg / 1 mm",
           lambda s, a, g, k, region=None: _bspline(s, a, g, k)),
    Family("local", "Gaussian velocity bump of radius 8-16 mm, peak 5 mm, at a random point of the region; rigid "
           "1 deg / 1 mm", _local),
)}


def draw_pair_map(family: str, shape, affine, gen: torch.Generator, strength: float,
                  region: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """``(fwd, inv)`` of one pair of ``family`` (:data:`FAMILIES`) at ``strength``; ValueError for an unknown name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family].draw(tuple(shape), torch.as_tensor(affine, dtype=torch.float64), gen, strength,
                                 region=region)


def rigidly_moved(data: np.ndarray, affine: np.ndarray, degrees=(3.0, -2.0, 4.0), shift_mm=(4.0, -3.0, 2.0)):
    """``(moved image, true map)``: ``data`` moved by a rigid world transform about the grid centre.

    The true map (source = ``data`` -> target = moved) is in source voxels, ``(3, *shape)`` float64.
    """
    a = torch.as_tensor(affine, dtype=torch.float64)
    rot = rotation_matrices(torch.deg2rad(torch.tensor([degrees], dtype=torch.float64)), 3)[0]
    m = T.about_grid_centre(rot, torch.tensor(shift_mm, dtype=torch.float64), data.shape, a)
    phi = T.affine_map(m, data.shape, torch.float64)
    moved = T.warp(torch.as_tensor(data, dtype=torch.float32)[None, None], phi.float())[0, 0].numpy()
    return moved, phi[0].numpy()


def demo_intensity(img: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """The demo's intensity change: gamma in exp(+-0.2), a bias field (sd 0.05 on a 4^3 grid), noise 1 % of max."""
    x = torch.as_tensor(img)[None, None]
    gamma = float(torch.exp((torch.rand(1, generator=gen) * 2 - 1) * 0.2))
    bias = F.interpolate(torch.randn(1, 1, 4, 4, 4, generator=gen) * 0.05, size=img.shape, mode="trilinear",
                         align_corners=True)
    hi = float(x.max())
    x = (x.clamp_min(0) / hi) ** gamma * torch.exp(bias) * hi
    x = x + torch.randn(x.shape, generator=gen) * 0.01 * hi
    return x[0, 0].numpy().astype(np.float32)


def wide_intensity(img: np.ndarray, gen: torch.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """A calibration pair's intensity change and what was drawn: gamma in exp(+-0.4) (contrast curve), a bias
    field (sd 0.1 on a 4^3 grid, multiplicative), noise 0-4 % of the maximum, blur sigma 0-1 voxel (resolution)."""
    from scipy import ndimage

    drawn = {"gamma": float(torch.exp(_uniform(gen, 1) * 0.4)), "bias_sd": 0.1,
             "noise": float(torch.rand(1, generator=gen, dtype=torch.float64)) * 0.04,
             "blur_voxels": float(torch.rand(1, generator=gen, dtype=torch.float64))}
    x = torch.as_tensor(img, dtype=torch.float32)[None, None]
    bias = F.interpolate(torch.randn(1, 1, 4, 4, 4, generator=gen) * drawn["bias_sd"], size=img.shape,
                         mode="trilinear", align_corners=True)
    hi = float(x.max())
    x = ((x.clamp_min(0) / hi) ** drawn["gamma"] * torch.exp(bias) * hi)[0, 0].numpy()
    if drawn["blur_voxels"] > 0.05:
        x = ndimage.gaussian_filter(x, drawn["blur_voxels"])
    x = x + torch.randn(x.shape, generator=gen).numpy() * drawn["noise"] * hi
    return x.astype(np.float32), drawn


# ---------------------------------------------------------------------------------------------------------------
# Injected failures
# ---------------------------------------------------------------------------------------------------------------


def _blank_slab(img: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """A third of the field of view blanked along a random axis, from either end."""
    axis = int(torch.randint(3, (1,), generator=gen))
    n = img.shape[axis] // 3
    index = [slice(None)] * 3
    index[axis] = slice(0, n) if float(torch.rand(1, generator=gen)) < 0.5 else slice(img.shape[axis] - n, None)
    out = img.copy()
    out[tuple(index)] = 0.0
    return out


def _blank_front(img: np.ndarray) -> np.ndarray:
    """The first third of the field of view along the second axis blanked (the demo's truncation)."""
    out = img.copy()
    out[:, : img.shape[1] // 3] = 0.0
    return out


def _noise(img: np.ndarray, gen: torch.Generator, level: float = 0.3) -> np.ndarray:
    return (img + torch.randn(img.shape, generator=gen).numpy() * level * img.max()).astype(np.float32)


def _invert(img: np.ndarray) -> np.ndarray:
    head = img > 0.1 * img.max()
    return np.where(head, img.max() - img, 0.0).astype(np.float32)


@dataclass(frozen=True)
class Failure:
    """An injected failure kind: ``strength`` multiplies the pair's family strength; ``velocity_mm`` adds a smooth
    velocity field of that size (the demo's 7 x 8 x 7 grid) after the pair's map; ``rotation_deg`` adds a
    rotation about one random axis drawn in that range; ``image(img, gen, other)`` changes the subject image
    (``other``: another anatomy, moved by the pair's map, on the same grid)."""

    name: str
    description: str
    strength: float = 1.0
    velocity_mm: float = 0.0
    rotation_deg: tuple[float, float] | None = None
    image: Callable[[np.ndarray, torch.Generator, np.ndarray | None], np.ndarray] | None = None
    needs_other: bool = False


FAILURES: dict[str, Failure] = {f.name: f for f in (
    Failure("extreme_deformation", "a smooth 8 mm velocity field (4x the demo's) on top of the pair's map",
            velocity_mm=8.0),
    Failure("large_rotation", "25-40 degrees about one axis on top of the pair's map", rotation_deg=(25.0, 40.0)),
    Failure("contrast_inversion", "intensities inverted in the head (another contrast)",
            image=lambda img, gen, other: _invert(img)),
    Failure("missing_slab", "a third of the field of view blanked along one axis",
            image=lambda img, gen, other: _blank_slab(img, gen)),
    Failure("heavy_noise", "Gaussian noise of 30 % of the maximum intensity",
            image=lambda img, gen, other: _noise(img, gen)),
    Failure("other_subject", "another person's brain, where its scanner put it, moved by the pair's map (a "
            "mislabelled file)",
            image=lambda img, gen, other: other, needs_other=True),
    Failure("corrupted", "the demo's: the first third of the second axis blanked and noise of 30 % of the maximum",
            image=lambda img, gen, other: _noise(_blank_front(img), gen)),
)}


def with_velocity(fwd: Tensor, inv: Tensor, shape, affine, gen: torch.Generator,
                  velocity_mm: float) -> tuple[Tensor, Tensor]:
    """``(fwd, inv)`` of ``a o d``: the pair's map ``a`` after a smooth deformation ``d`` (:func:`subject_map` with
    no affine part and a velocity of ``velocity_mm``)."""
    fwd_d, inv_d = subject_map(shape, affine, gen, rot_deg=0.0, shift_mm=0.0, scale=0.0, vel_mm=velocity_mm)
    return T.sample_map(fwd, fwd_d), T.sample_map(inv_d, inv)


def with_rotation(fwd: Tensor, inv: Tensor, shape, affine, gen: torch.Generator,
                  degrees: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """``(fwd, inv)`` of ``R o a``: a rotation about one random axis (drawn in ``degrees``) about the grid centre,
    applied after the pair's map ``a`` (the subject image is the rotated subject)."""
    axis = int(torch.randint(3, (1,), generator=gen))
    deg = torch.zeros(1, 3, dtype=torch.float64)
    sign = 1.0 if float(torch.rand(1, generator=gen)) < 0.5 else -1.0
    deg[0, axis] = sign * (degrees[0] + (degrees[1] - degrees[0]) * float(torch.rand(1, generator=gen)))
    a = torch.as_tensor(affine, dtype=torch.float64)
    r = T.about_grid_centre(rotation_matrices(torch.deg2rad(deg), 3)[0], torch.zeros(3, dtype=torch.float64),
                            shape, a)
    rotated_grid = T.affine_map(r, shape, torch.float64)
    return T.sample_map(fwd, rotated_grid), T.apply_affine(torch.linalg.inv(r), inv)
