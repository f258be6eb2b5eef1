"""Exports: headers copied from the target, maps as ITK displacement fields that SimpleITK (the library ITK, ANTs
and Slicer share) applies to the source exactly as equiqc warps it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from equiqc.pipeline import transforms as T
from equiqc.pipeline.estimator import UncertaintyResult
from equiqc.pipeline.moments import components
from equiqc.storage import results as R
from equiqc.storage.cohort import ingest_pair, read_pair
from equiqc.storage.export import export_array
from equiqc.storage.manifest import read_manifest
from equiqc.storage.nifti import load_volume, to_original_orientation
from equiqc.workflows.cli import main

RNG = np.random.default_rng(0)


def oblique(codes_flip, spacing, degrees, offset):
    """A voxel-to-RAS affine: axis flips (e.g. LPS = (-1, -1, 1)), spacing, a tilt about z and one about x."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    a = np.eye(4)
    a[:3, :3] = rz @ rx @ np.diag(np.array(codes_flip) * np.array(spacing))
    a[:3, 3] = offset
    return a


def smooth_image(shape):
    return (gaussian_filter(RNG.random(shape), 2.0) * 1000).astype(np.float32)


def write(path, data, affine, sform_code=1, qform_code=1):
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine, code=qform_code)
    nib.save(img, str(path))
    return path


@pytest.fixture
def lps_oblique_pair(tmp_path):
    """An LPS oblique target (MNI sform code 4, no qform) and a differently oriented oblique source, ingested, with
    a known non-linear map stored as a pair's prediction."""
    tgt_affine = oblique((-1, -1, 1), (1.5, 1.2, 2.0), 12.0, (40.0, 30.0, -25.0))
    src_affine, src_shape = oblique((1, -1, -1), (1.3, 1.4, 1.6), -7.0, (0.0, 0.0, 0.0)), (44, 42, 40)
    centre = tgt_affine[:3, :3] @ (np.array([30, 34, 24]) - 1) / 2 + tgt_affine[:3, 3]
    src_affine[:3, 3] = centre - src_affine[:3, :3] @ (np.array(src_shape) - 1) / 2  # same centre, larger field
    write(tmp_path / "tgt.nii.gz", smooth_image((30, 34, 24)), tgt_affine, sform_code=4, qform_code=0)
    write(tmp_path / "mask.nii.gz", np.ones((30, 34, 24), np.uint8), tgt_affine, sform_code=4, qform_code=0)
    write(tmp_path / "src.nii.gz", smooth_image(src_shape), src_affine)
    (tmp_path / "m.csv").write_text("subject_id,source,target,target_mask\ns1,src.nii.gz,tgt.nii.gz,mask.nii.gz\n")
    spec = read_manifest(tmp_path / "m.csv")[0]
    ingest_pair(spec, tmp_path / "cohort.zarr")
    stored = read_pair(tmp_path / "cohort.zarr", spec.pair_id)
    tgt, src = stored["target"], stored["source"]
    # the map: target world -> rotated and shifted world, plus a smooth bend, in RAS+ source voxels
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in tgt.data.shape], indexing="ij"))
    world = np.einsum("ij,j...->i...", tgt.affine[:3, :3], grid) + tgt.affine[:3, 3, None, None, None]
    c, s = np.cos(np.deg2rad(4)), np.sin(np.deg2rad(4))
    moved = np.einsum("ij,j...->i...", np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]), world)
    moved += np.array([2.0, -1.5, 1.0])[:, None, None, None]
    moved[0] += 2.0 * np.sin(world[1] / 15.0)
    inv = np.linalg.inv(src.affine)
    psi = (np.einsum("ij,j...->i...", inv[:3, :3], moved) + inv[:3, 3, None, None, None]).astype(np.float32)
    shape = tgt.data.shape
    result = UncertaintyResult(std_mm=RNG.random(shape).astype(np.float32),
                               covariance_mm2=RNG.random((6, *shape)).astype(np.float32), components=components(3),
                               mean_map=psi, prediction_map=psi, n_valid=np.full(shape, 8, np.int32), n_samples=8)
    R.write_result(tmp_path / "results.zarr", spec.pair_id, result, tgt.affine, {"k": 8})
    return tmp_path, spec.pair_id, src, psi


def equiqc_warp_in_target_file_order(src, psi):
    warped = T.warp(torch.as_tensor(src.data)[None, None], torch.as_tensor(psi)[None])[0, 0].numpy()
    inside = np.all([(psi[d] > 1) & (psi[d] < n - 2) for d, n in enumerate(src.data.shape)], axis=0)
    return warped, inside


@pytest.mark.parametrize("suffix", ["nii.gz", "h5"])
def test_simpleitk_applies_the_exported_field_like_equiqc_warps(lps_oblique_pair, suffix):
    folder, pair, src, psi = lps_oblique_pair
    field = export_array(folder / "results.zarr", folder / "cohort.zarr", pair, "prediction_map",
                         folder / f"field.{suffix}")
    if suffix == "nii.gz":  # ANTs' layout: 5D (X, Y, Z, 1, 3), intent 'vector', on the target file's grid
        img = nib.load(str(field))
        assert img.shape == (30, 34, 24, 1, 3) and img.header.get_intent()[0] == "vector"
        np.testing.assert_allclose(img.affine, nib.load(str(folder / "tgt.nii.gz")).affine, atol=1e-4)
        transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(field)), sitk.sitkVectorFloat64))
    else:
        transform = sitk.ReadTransform(str(field))
    target = sitk.ReadImage(str(folder / "tgt.nii.gz"))
    source = sitk.ReadImage(str(folder / "src.nii.gz"), sitk.sitkFloat32)
    by_itk = sitk.GetArrayFromImage(sitk.Resample(source, target, transform, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    warped, inside = equiqc_warp_in_target_file_order(src, psi)
    original = np.asarray(nib.load(str(folder / "tgt.nii.gz")).affine)
    ours, inside = to_original_orientation(warped, original), to_original_orientation(inside, original)
    assert inside.mean() > 0.5
    r = np.corrcoef(by_itk[inside], ours[inside])[0, 1]
    print(f"correlation inside: {r:.5f} over {int(inside.sum())} voxels")
    assert r > 0.99
    assert np.abs(by_itk[inside] - ours[inside]).mean() < 0.02 * np.abs(ours[inside]).mean()


def test_volumes_copy_the_target_header_and_estimate_writes_on_the_target_grid(lps_oblique_pair, tmp_path):
    folder, pair, *_ = lps_oblique_pair
    std = nib.load(str(export_array(folder / "results.zarr", folder / "cohort.zarr", pair, "std_mm",
                                    folder / "std.nii.gz")))
    target = nib.load(str(folder / "tgt.nii.gz"))
    assert (int(std.header["sform_code"]), int(std.header["qform_code"])) == (4, 0)  # MNI sform, no qform
    assert std.header.get_xyzt_units()[0] == "mm" and std.shape == target.shape
    np.testing.assert_allclose(std.affine, target.affine, atol=1e-5)
    # equiqc estimate --out: the target's own grid and header too, voxel for voxel
    write(tmp_path / "src_lps.nii.gz", smooth_image((20, 22, 18)), oblique((-1, -1, 1), (2, 2, 2), 5.0, (0, 0, 0)),
          sform_code=4, qform_code=0)
    write(tmp_path / "tgt_las.nii.gz", smooth_image((20, 22, 18)), oblique((-1, 1, 1), (2, 2, 2), 0.0, (20, -20, 0)),
          sform_code=4, qform_code=0)
    assert main(["estimate", str(tmp_path / "src_lps.nii.gz"), str(tmp_path / "tgt_las.nii.gz"), "--model",
                 "affine-opt", "--samples", "2", "--out", str(tmp_path / "std_est.nii.gz")]) == 0
    est, tgt = nib.load(str(tmp_path / "std_est.nii.gz")), nib.load(str(tmp_path / "tgt_las.nii.gz"))
    assert est.shape == tgt.shape and np.allclose(est.affine, tgt.affine)
    assert int(est.header["sform_code"]) == 4 and nib.aff2axcodes(est.affine) == ("L", "A", "S")
    assert load_volume(tmp_path / "std_est.nii.gz").data.shape == load_volume(tmp_path / "tgt_las.nii.gz").data.shape


def test_export_several_pairs_or_all(lps_oblique_pair, capsys):
    folder, pair, *_ = lps_oblique_pair
    assert main(["export", str(folder), "--all", "--to", str(folder / "out"), "--arrays", "std_mm,prediction_map",
                 "--transform-format", "h5"]) == 0
    assert sorted(p.name for p in (folder / "out").iterdir()) == [f"{pair}_prediction_map_xfm.h5",
                                                                  f"{pair}_std_mm.nii.gz"]
    assert main(["export", str(folder), "--pair", pair, "--pair", "nope", "--to", str(folder / "o2")]) == 2
    assert "pair 'nope' has no results" in capsys.readouterr().err
