"""Perturbation samplers: ranges in physical units, centre, determinism, diffeomorphism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equiqc.pipeline import transforms as T
from equiqc.pipeline.perturbations import PerturbationConfig, pair_seed, sample_perturbations

AFFINE = torch.tensor([[1.5, 0, 0, -40.0], [0, 1.0, 0, 10.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]], dtype=torch.float64)
SHAPE = (20, 30, 12)


def world(p):
    return AFFINE @ p.matrices @ torch.linalg.inv(AFFINE)


@given(seed=st.integers(0, 2**40), kind=st.sampled_from(["translation", "rigid", "affine"]))
@settings(max_examples=20, deadline=None)
def test_affine_families_stay_within_their_ranges(seed, kind):
    cfg = PerturbationConfig(kind=kind, max_translation_mm=3.0, max_rotation_deg=10.0)
    p = sample_perturbations(cfg, 16, SHAPE, AFFINE, seed)
    w = world(p)
    lin = w[:, :3, :3]
    c = T.grid_centre_mm(SHAPE, AFFINE)
    moved_centre = (lin @ c + w[:, :3, 3])
    assert ((moved_centre - c).abs() <= 3.0 + 1e-9).all()  # the centre moves by the translation only
    if kind == "translation":
        assert torch.allclose(lin, torch.eye(3, dtype=torch.float64).expand_as(lin))
    if kind == "rigid":
        assert torch.allclose(lin @ lin.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(lin),
                              atol=1e-12)
        angle = torch.rad2deg(torch.arccos(((lin.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
        assert (angle <= 10.0 * np.sqrt(3) + 1e-6).all()
    if kind == "affine":
        assert (torch.linalg.det(lin) > 0).all()


@given(seed=st.integers(0, 2**40), kind=st.sampled_from(["scale", "shear"]))
@settings(max_examples=20, deadline=None)
def test_scale_and_shear_are_one_part_of_affine_alone_about_the_centre(seed, kind):
    cfg = PerturbationConfig(kind=kind, max_log_scale=0.1, max_shear=0.05)
    w = world(sample_perturbations(cfg, 16, SHAPE, AFFINE, seed))
    lin = w[:, :3, :3]
    c = T.grid_centre_mm(SHAPE, AFFINE)
    assert torch.allclose(lin @ c + w[:, :3, 3], c.expand(16, 3), atol=1e-9)  # no translation, centre fixed
    if kind == "scale":  # world-axis scalings: diagonal, each factor within exp(+-0.1), not all equal to 1
        assert torch.allclose(lin, torch.diag_embed(lin.diagonal(dim1=1, dim2=2)), atol=1e-12)
        assert (lin.diagonal(dim1=1, dim2=2).log().abs() <= 0.1 + 1e-12).all()
        assert (lin.diagonal(dim1=1, dim2=2) - 1).abs().max() > 1e-3
    else:  # unit upper triangular: volume kept, off-diagonal terms within +-0.05
        assert torch.allclose(torch.tril(lin), torch.eye(3, dtype=torch.float64).expand_as(lin), atol=1e-12)
        upper = torch.triu(lin, diagonal=1)
        assert (upper.abs() <= 0.05 + 1e-12).all() and upper.abs().max() > 1e-4


def test_same_seed_same_draws_and_pair_seed_is_stable():
    cfg = PerturbationConfig(kind="affine")
    a = sample_perturbations(cfg, 5, SHAPE, AFFINE, 42)
    b = sample_perturbations(cfg, 5, SHAPE, AFFINE, 42)
    c = sample_perturbations(cfg, 5, SHAPE, AFFINE, 43)
    assert torch.equal(a.matrices, b.matrices) and not torch.equal(a.matrices, c.matrices)
    # affine's draws are pinned (scale and shear families added after it must not change a stored run's samples)
    first = sample_perturbations(cfg, 1, SHAPE, AFFINE, 7).matrices[0, 0]
    assert torch.allclose(first, torch.tensor([0.9808962642546579, -0.018743885301505274, -0.15485895995205917,
                                               0.12835839902305324], dtype=torch.float64), atol=1e-12)
    assert pair_seed(0, "sub-01") == pair_seed(0, "sub-01") != pair_seed(1, "sub-01")
    assert pair_seed(0, "sub-01") == 3645224990371179424  # sha256("0:sub-01"): fixed across processes


def test_diffeomorphic_perturbation_is_smooth_invertible_and_of_the_stated_size():
    cfg = PerturbationConfig(kind="diffeomorphic", velocity_std_mm=2.0, control_spacing_mm=15.0)
    p = sample_perturbations(cfg, 4, SHAPE, AFFINE, 0)
    tau = p.maps(range(4), dtype=torch.float64)
    assert tau.shape == (4, 3, *SHAPE)
    assert (T.jacobian_determinant(tau) > 0).all()
    disp_mm = torch.einsum("ij,bj...->bi...", AFFINE[:3, :3], T.map_to_displacement(tau))
    rms = disp_mm.pow(2).mean().sqrt()
    assert 0.8 < float(rms) < 4.0  # ~velocity_std_mm per component (integration changes it a little)


@pytest.mark.parametrize("bad", [dict(kind="bspline"), dict(max_translation_mm=-1.0),
                                 dict(max_rotation_deg=float("nan")), dict(control_spacing_mm=0.0)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError, match="perturbation"):
        PerturbationConfig(**bad)


def test_diffeomorphic_maps_integrated_on_the_coarse_grid_match_full_resolution(monkeypatch):
    # The velocity is integrated on a grid of INTEGRATION_SUBDIVISIONS intervals per control interval, then
    # upsampled. Against scaling and squaring on the full 2 mm MNI-sized grid (the previous implementation):
    from equiqc.pipeline import perturbations as P

    shape, affine = (99, 117, 95), torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    pert = sample_perturbations(PerturbationConfig("diffeomorphic"), 2, shape, affine, seed=1)
    grid = P.integration_grid(shape, pert.velocity.shape[2:])
    assert all(g < n for g, n in zip(grid, shape, strict=True))
    coarse = pert.maps([0, 1])
    monkeypatch.setattr(P, "INTEGRATION_SUBDIVISIONS", 10**6)
    full = pert.maps([0, 1])
    error_mm = (coarse - full).norm(dim=1) * 2
    size_mm = T.map_to_displacement(full).norm(dim=1) * 2
    assert size_mm.mean() > 1.0
    assert error_mm.mean() < 0.02 and error_mm.max() < 0.6  # measured: 0.010 and 0.39 mm (seed 1)
    assert (T.jacobian_determinant(coarse) > 0).all()


def test_diffeomorphic_composition_from_the_coarse_field_matches_the_upsampled_map():
    # compose_back evaluates tau's displacement on its coarse integration grid at the predictions, instead of
    # building tau on the full source grid and interpolating that (the previous implementation): the two agree
    # up to the difference between one and two linear interpolations (2 mm MNI-sized grid, mm).
    shape, affine = (99, 117, 95), torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    pert = sample_perturbations(PerturbationConfig("diffeomorphic"), 2, shape, affine, seed=3)
    tau = pert.dense([0, 1])
    assert all(g < n for g, n in zip(tau.displacement.shape[2:], shape, strict=True))  # never on the full grid
    gen = torch.Generator().manual_seed(0)
    phi_prime = T.identity_grid((40, 50, 45)) * 2.2 + torch.randn(2, 3, 40, 50, 45, generator=gen) * 3
    coarse = pert.compose_back([0, 1], phi_prime, tau)
    dense = T.compose(pert.maps([0, 1]), phi_prime)
    inside = T.inside_grid(phi_prime, shape)
    error_mm = ((coarse - dense).norm(dim=1) * 2)[inside]
    moved_mm = ((coarse - phi_prime).norm(dim=1) * 2)[inside]
    assert moved_mm.mean() > 1.0
    assert error_mm.mean() < 0.01 and error_mm.max() < 0.2, (error_mm.mean(), error_mm.max())  # 0.0035, 0.12 mm
    # on the source grid itself, evaluating tau at every voxel is linearly upsampling its coarse displacement
    upsampled = T.displacement_to_map(T.resize_displacement(
        tau.displacement * torch.tensor([(g - 1) / (n - 1) for g, n in zip(tau.displacement.shape[2:], shape,
                                                                          strict=True)]).view(1, 3, 1, 1, 1), shape))
    np.testing.assert_allclose(tau(T.identity_grid(shape)).numpy(), upsampled.numpy(), atol=1e-4)
    np.testing.assert_allclose(pert.maps([0, 1]).numpy(), upsampled.numpy(), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(perm=st.permutations([0, 1, 2]), signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
       scales=st.lists(st.floats(0.3, 2.5), min_size=3, max_size=3),
       offsets=st.lists(st.floats(-4.0, 4.0), min_size=3, max_size=3), rotate=st.booleans())
def test_a_dense_warp_on_a_grid_equals_evaluating_it_at_the_grid_positions(perm, signs, scales, offsets, rotate):
    # on_grid uses separable interpolation for axis-aligned matrices (signed permutations with scales, as network
    # grids are) and grid_sample otherwise; both give tau at the grid's positions, border padding included
    shape, out = (13, 11, 9), (7, 10, 8)
    tau = sample_perturbations(PerturbationConfig("diffeomorphic", velocity_std_mm=3.0, control_spacing_mm=6.0), 2,
                               shape, torch.eye(4, dtype=torch.float64), seed=5).dense([0, 1], dtype=torch.float64)
    m = torch.eye(4, dtype=torch.float64)
    for row, col in enumerate(perm):
        m[row] = 0
        m[row, col] = signs[row] * scales[row]
        m[row, 3] = offsets[row] + (shape[row] - 1) * (signs[row] < 0)
    m[3, 3] = 1
    if rotate:  # not axis-aligned: the grid_sample path
        m = m @ T.matrix_from_parts(sample_perturbations(PerturbationConfig("rigid", max_rotation_deg=20.0), 1,
                                                         out, None, seed=2).matrices[0, :3, :3], torch.zeros(3))
    np.testing.assert_allclose(tau.on_grid(m, out).numpy(), tau(T.affine_map(m, out, torch.float64)).numpy(),
                               atol=1e-9)
