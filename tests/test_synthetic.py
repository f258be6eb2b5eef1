"""Synthetic pairs with known maps: every generator family's map and its inverse, strength, injected failures, and
the family cohorts ``equiqc calibrate`` builds."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter

from equiqc.pipeline import transforms as T
from equiqc.pipeline.synthetic import FAILURES, FAMILIES, draw_pair_map, fixed_point_inverse, with_rotation
from equiqc.storage.nifti import load_volume, save_volume
from equiqc.workflows.demo import build_family_cohort, family_plan

SHAPE = (30, 34, 28)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
VOXEL_MM = np.array([3.0, 3.0, 3.0])[:, None, None, None]


def _mm(u: torch.Tensor) -> np.ndarray:
    """Per-voxel length (mm) of a displacement (1, 3, *SHAPE) in voxels."""
    return np.sqrt(((u[0].numpy() * VOXEL_MM) ** 2).sum(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gives_a_map_and_its_inverse(family):
    region = np.zeros(SHAPE, bool)
    region[8:22, 8:26, 8:20] = True
    fwd, inv = draw_pair_map(family, SHAPE, AFFINE, torch.Generator().manual_seed(1), 1.5, region=region)
    grid = T.identity_grid(SHAPE, torch.float64)
    round_trip = _mm(T.sample_map(fwd, inv) - grid)  # fwd(inv(x)) = x
    assert np.median(round_trip[region]) < 0.1 and round_trip[region].max() < 1.0  # mm, on 3 mm voxels
    assert _mm(inv - grid)[region].mean() > 0.3  # it moved something
    assert float(T.jacobian_determinant(fwd)[0][torch.as_tensor(region)].min()) > 0  # no folding


@pytest.mark.parametrize("family", list(FAMILIES))
def test_strength_scales_the_family(family):
    sizes = []
    for strength in (0.5, 2.0):
        fwd, inv = draw_pair_map(family, SHAPE, AFFINE, torch.Generator().manual_seed(2), strength)
        sizes.append(_mm(inv - T.identity_grid(SHAPE, torch.float64)).max())  # the largest move (mm)
    assert sizes[1] > 1.5 * sizes[0]
    with pytest.raises(ValueError, match="unknown generator family 'nope'"):
        draw_pair_map("nope", SHAPE, AFFINE, torch.Generator(), 1.0)


def test_fixed_point_inverse_of_a_smooth_displacement():
    u = torch.as_tensor(gaussian_filter(np.random.default_rng(0).normal(0, 6, (3, *SHAPE)), (0, 4, 4, 4)))[None]
    w = fixed_point_inverse(u)
    composed = w + T.warp(u, T.displacement_to_map(w), padding="border")  # (id + u) o (id + w) - id
    assert float(composed[..., 3:-3, 3:-3, 3:-3].abs().max()) < 1e-3


def test_a_large_rotation_on_top_of_a_map_keeps_map_and_inverse_consistent():
    gen = torch.Generator().manual_seed(3)
    fwd, inv = draw_pair_map("affine", SHAPE, AFFINE, gen, 0.5)
    fwd2, inv2 = with_rotation(fwd, inv, SHAPE, AFFINE, gen, (30.0, 30.0))
    grid = T.identity_grid(SHAPE, torch.float64)
    centre = (slice(None), slice(None), slice(10, 20), slice(12, 22), slice(10, 18))
    assert float((T.sample_map(fwd2, inv2) - grid)[centre].abs().max()) < 1e-3
    assert _mm(inv2 - grid).mean() > 3 * _mm(inv - grid).mean()


def test_the_failure_kinds_the_validation_injects_are_declared():
    assert {"extreme_deformation", "large_rotation", "contrast_inversion", "missing_slab", "heavy_noise",
            "other_subject"} <= set(FAILURES)
    image = np.random.default_rng(4).random(SHAPE).astype(np.float32) + 0.5
    gen = torch.Generator().manual_seed(0)
    assert (FAILURES["missing_slab"].image(image, gen, None) == 0).mean() == pytest.approx(1 / 3, abs=0.05)
    assert np.corrcoef(FAILURES["contrast_inversion"].image(image, gen, None).ravel(), image.ravel())[0, 1] < -0.9
    added = FAILURES["heavy_noise"].image(image, gen, None) - image
    assert added.std() == pytest.approx(0.3 * image.max(), rel=0.05)


def test_a_family_cohort_records_families_strengths_kinds_and_intensity(tmp_path):
    template = gaussian_filter(np.random.default_rng(5).random(SHAPE), 2).astype(np.float32)
    save_volume(tmp_path / "t.nii.gz", template, AFFINE)
    plan = family_plan(["affine", "local"], 2, (0.5, 1.0), seed=0, kinds=("large_rotation", "heavy_noise"))
    assert [p["family"] for p in plan] == ["affine"] * 2 + ["local"] * 2 + ["affine"] * 2 + ["local"] * 2
    cohort = build_family_cohort(tmp_path / "c", plan, seed=0, atlas=tmp_path / "t.nii.gz")
    injected = pd.read_csv(tmp_path / "c" / "data" / "injected.csv")
    assert list(injected.kind) == ["good"] * 4 + ["large_rotation", "heavy_noise"] * 2
    assert set(injected.columns) >= {"family", "strength", "gamma", "noise", "blur_voxels"}
    truth = nib.load(tmp_path / "c" / "data" / "sub-001_to_atlas_truth.nii.gz")
    assert truth.shape == (*SHAPE, 3) and len(cohort.truth) == 8
    again = build_family_cohort(tmp_path / "d", plan, seed=0, atlas=tmp_path / "t.nii.gz")  # seeded: identical
    a, b = (load_volume(p / "data" / "sub-003_T1w.nii.gz").data for p in (tmp_path / "c", tmp_path / "d"))
    assert np.array_equal(a, b) and again.truth == cohort.truth
    other = family_plan(["affine"], 2, (0.5, 1.0), seed=0, anatomies=("template", "other"))
    assert [p["anatomy"] for p in other] == ["template", "other"]
    pytest.importorskip("MultiPropReg")  # the other anatomy is its adult atlas
    build_family_cohort(tmp_path / "o", other, seed=0, atlas=tmp_path / "t.nii.gz")
    manifest = pd.read_csv(tmp_path / "o" / "data" / "manifest.csv")
    assert list(manifest.target) == ["atlas.nii.gz", "other_atlas.nii.gz"]
    assert list(pd.read_csv(tmp_path / "o" / "data" / "injected.csv").anatomy) == ["template", "other"]
    assert nib.load(tmp_path / "o" / "data" / "other_atlas_brain_mask.nii.gz").get_fdata().any()
    with pytest.raises(ValueError, match="unknown failure kind"):
        build_family_cohort(tmp_path / "e", [{"family": "affine", "strength": 1.0, "kind": "nope"}],
                            atlas=tmp_path / "t.nii.gz")


def test_a_velocity_on_top_of_a_map_keeps_map_and_inverse_consistent():
    from equiqc.pipeline.synthetic import with_velocity

    gen = torch.Generator().manual_seed(6)
    fwd, inv = draw_pair_map("affine", SHAPE, AFFINE, gen, 0.5)
    fwd2, inv2 = with_velocity(fwd, inv, SHAPE, AFFINE, gen, 8.0)
    grid = T.identity_grid(SHAPE, torch.float64)
    centre = (slice(None), slice(None), slice(8, 22), slice(8, 26), slice(8, 20))
    assert float(np.median(_mm(T.sample_map(fwd2, inv2) - grid)[centre[2:]])) < 0.5  # of 8 mm, 3 mm voxels
    assert _mm(inv2 - inv)[centre[2:]].mean() > 3.0  # the velocity moved it several mm more
