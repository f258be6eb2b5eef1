"""storage/: manifest validation, NIfTI -> Zarr ingest, result store, export round trips, Parquet report."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import warnings
from collections import OrderedDict

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr

from equiqc.pipeline.estimator import UncertaintyResult
from equiqc.pipeline.moments import components
from equiqc.storage import results as R
from equiqc.storage.arrays import chunks_for, write_array
from equiqc.storage.cohort import ingest_and_keep, ingest_pair, open_cohort, pair_status, read_pair
from equiqc.storage.export import export_array
from equiqc.storage.manifest import ManifestError, derive_pair_id, read_manifest
from equiqc.storage.report import SCHEMA, write_report

RNG = np.random.default_rng(0)
SHAPE = (12, 10, 8)


def lps_oblique_affine() -> np.ndarray:
    """LPS-like axes, anisotropic voxels, a 10-degree oblique tilt, an offset."""
    c, s = np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-1.2, -0.8, 2.5])
    a[:3, 3] = [60.0, 40.0, -20.0]
    return a


def write_nii(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def make_manifest(tmp_path, rows, name="manifest.csv", header="subject_id,source,target"):
    lines = [header] + [",".join(r) for r in rows]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_resolves_paths_and_derives_stable_ids(tmp_path):
    (tmp_path / "sub").mkdir()
    m = make_manifest(tmp_path, [["s1", "sub/a.nii.gz", "b.nii"], ["s 2", "c.nii.gz", "d.nii.gz"]])
    pairs = read_manifest(m)
    assert pairs[0].source == (tmp_path / "sub" / "a.nii.gz").resolve()
    assert pairs[0].pair_id == "s1_a_to_b" == derive_pair_id("s1", "x/a.nii.gz", "b.nii")
    assert pairs[1].pair_id == "s-2_c_to_d" and pairs[1].row == 3
    tsv = tmp_path / "m.tsv"
    tsv.write_text("subject_id\tsource\ttarget\tpair_id\ts1\ta.nii\tb.nii\tp1\n".replace("\ts1", "\ns1"))
    assert read_manifest(tsv)[0].pair_id == "p1"


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("subject_id,source,target\n", "no pairs"),
    ("subject_id,source\ns1,a.nii\n", "missing required column 'target'"),
    ("subject_id,source,target,age\ns1,a,b,3\n", "row 1, column 'age': unknown column"),
    ("subject_id;source;target\ns1;a;b\n", "row 1: the header"),
    ("subject_id,source,target,pair_id\ns1,a,b,p\ns2,c,d,p\n", "row 3, column 'pair_id': duplicate"),
    ("subject_id,source,target\ns1,,b\n", "row 2, column 'source': empty"),
    ("subject_id,source,target\ns1,a,b,c\n", "row 2: 4 fields"),
    ("subject_id,source,target,pair_id\ns1,a,b,../x\n", "row 2, column 'pair_id'"),
])
def test_manifest_errors_name_row_and_column(tmp_path, content, message):
    p = tmp_path / "manifest.csv"
    p.write_text(content)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")) as info:
        read_manifest(p)
    assert str(p) in str(info.value)


def test_manifest_missing_or_unreadable(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(p)


# ------------------------------------------------------------------------------------------------ ingest


def cohort_files(tmp_path, affine=None):
    src = RNG.normal(size=SHAPE).astype(np.float32)
    tgt = RNG.normal(size=SHAPE).astype(np.float32)
    write_nii(tmp_path / "src.nii.gz", src, affine)
    write_nii(tmp_path / "tgt.nii.gz", tgt, affine)
    mask = (RNG.random(SHAPE) > 0.5).astype(np.uint8)
    write_nii(tmp_path / "mask.nii.gz", mask, affine)
    return src, tgt, mask


def test_ingest_round_trip_keeps_geometry_and_export_restores_the_original_grid(tmp_path):
    affine = lps_oblique_affine()
    src, tgt, mask = cohort_files(tmp_path, affine)
    m = make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz", "mask.nii.gz"]],
                      header="subject_id,source,target,target_mask")
    spec = read_manifest(m)[0]
    store, res = tmp_path / "cohort.zarr", tmp_path / "results.zarr"
    outcome, kept = ingest_and_keep(spec, store)
    assert outcome.status == "ingested"
    stored = read_pair(store, spec.pair_id)
    assert set(kept) == set(stored) == {"source", "target", "target_mask"}
    for role, volume in kept.items():  # what ingest keeps is what a read gives back
        assert volume.data.dtype == stored[role].data.dtype
        np.testing.assert_array_equal(volume.data, stored[role].data)
        np.testing.assert_array_equal(volume.affine, stored[role].affine)
        assert json.loads(json.dumps(volume.attrs)) == stored[role].attrs
    assert ingest_and_keep(spec, store) == (dataclasses.replace(outcome, status="unchanged"), None)
    target = stored["target"]
    assert target.attrs["orientation"] == ["L", "P", "S"]
    canonical = nib.as_closest_canonical(nib.load(str(tmp_path / "tgt.nii.gz")))
    np.testing.assert_array_equal(target.data, np.asarray(canonical.dataobj))
    np.testing.assert_allclose(target.affine, canonical.affine)
    np.testing.assert_allclose(target.attrs["spacing_mm"], [1.2, 0.8, 2.5], rtol=1e-6)
    np.testing.assert_array_equal(stored["target_mask"].data, np.asarray(canonical.dataobj) * 0 + (
        np.asarray(nib.as_closest_canonical(nib.load(str(tmp_path / "mask.nii.gz"))).dataobj) > 0))

    # A result equal to the stored target must export back to the original file voxel for voxel.
    result = fake_result(target.data.shape, std=target.data)
    R.write_result(res, spec.pair_id, result, target.affine, {"k": 1}, level="full")
    out = export_array(res, store, spec.pair_id, "std_mm", tmp_path / "std.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(img.dataobj), tgt)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    cov = nib.load(str(export_array(res, store, spec.pair_id, "covariance_mm2", tmp_path / "cov.nii.gz")))
    assert cov.shape == (*SHAPE, 6)


def test_map_export_is_an_itk_world_displacement(tmp_path):
    affine = np.diag([2.0, 3.0, 1.5, 1.0])
    cohort_files(tmp_path, affine)
    spec = read_manifest(make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz"]]))[0]
    store, res = tmp_path / "cohort.zarr", tmp_path / "results.zarr"
    ingest_pair(spec, store)
    result = fake_result(SHAPE)
    result.prediction_map = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(np.float32)
    result.prediction_map[0] += 1.0  # one source voxel along x = 2 mm
    R.write_result(res, spec.pair_id, result, affine, {"k": 1})
    disp = np.asarray(nib.load(str(export_array(res, store, spec.pair_id, "prediction_map",
                                                tmp_path / "d.nii.gz"))).dataobj)
    assert disp.shape == (*SHAPE, 1, 3)  # ITK/ANTs: 5D, LPS vectors (+2 mm along R is -2 mm along L)
    np.testing.assert_allclose(disp[..., 0, 0], -2.0, atol=1e-5)
    np.testing.assert_allclose(disp[..., 0, 1:], 0.0, atol=1e-5)


def test_ground_truth_indices_follow_a_non_ras_source_into_the_ras_arrays(tmp_path):
    """A true map given in the files' own voxels (target LPS oblique, source PIL) ingests in RAS+ voxels."""
    tgt_affine = lps_oblique_affine()
    src_affine = np.array([[0, 0, -1.5, 65.0], [-1.0, 0, 0, 42.0], [0, -2.0, 0, 2.0], [0, 0, 0, 1]])
    src_shape = (10, 12, 14)
    write_nii(tmp_path / "tgt.nii.gz", RNG.normal(size=SHAPE).astype(np.float32), tgt_affine)
    write_nii(tmp_path / "src.nii.gz", RNG.normal(size=src_shape).astype(np.float32), src_affine)
    # the world-identity map: target file voxel y -> source file voxel A_src^-1 A_tgt y (3 components last)
    y = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float64)
    to_src = np.linalg.inv(src_affine) @ tgt_affine
    write_nii(tmp_path / "truth.nii.gz", (y @ to_src[:3, :3].T + to_src[:3, 3]).astype(np.float32), tgt_affine)
    m = make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz", "truth.nii.gz"]],
                      header="subject_id,source,target,ground_truth")
    spec = read_manifest(m)[0]
    assert ingest_pair(spec, tmp_path / "cohort.zarr").status == "ingested"
    stored = read_pair(tmp_path / "cohort.zarr", spec.pair_id)
    src_ras, tgt_ras = stored["source"].affine, stored["target"].affine
    assert not np.allclose(src_ras, src_affine)  # the source really was reoriented
    y_ras = np.stack(np.meshgrid(*[np.arange(n) for n in stored["target"].data.shape], indexing="ij"))
    expected = np.einsum("ij,j...->i...", (np.linalg.inv(src_ras) @ tgt_ras)[:3, :3], y_ras) + (
        np.linalg.inv(src_ras) @ tgt_ras)[:3, 3, None, None, None]
    np.testing.assert_allclose(stored["ground_truth"].data, expected, atol=1e-4)


def test_reingest_is_skipped_when_unchanged_and_replaces_a_changed_pair(tmp_path):
    cohort_files(tmp_path)
    spec = read_manifest(make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz"]]))[0]
    store, res = tmp_path / "cohort.zarr", tmp_path / "results.zarr"
    first = ingest_pair(spec, store)
    chunk_files = sorted((store / "volumes").rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in chunk_files]
    assert len(chunk_files) > 4
    assert ingest_pair(spec, store).status == "unchanged"
    assert [f.stat().st_mtime_ns for f in chunk_files] == mtimes
    R.write_result(res, spec.pair_id, fake_result(SHAPE), np.eye(4), {"k": 1}, input_hash=first.input_hash)
    assert R.status(res, spec.pair_id, {"k": 1}, first.input_hash) == "complete"
    write_nii(tmp_path / "src.nii.gz", RNG.normal(size=SHAPE).astype(np.float32))
    second = ingest_pair(spec, store)
    assert second.status == "ingested" and second.input_hash != first.input_hash
    assert R.status(res, spec.pair_id, {"k": 1}, second.input_hash) == "stale"


def test_a_shared_atlas_is_stored_once_and_every_pair_reads_it(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    atlas = RNG.normal(size=SHAPE).astype(np.float32)
    write_nii(tmp_path / "atlas.nii.gz", atlas)
    write_nii(tmp_path / "atlas_mask.nii.gz", (atlas > 0).astype(np.uint8))
    rows = []
    for i in range(6):
        write_nii(tmp_path / f"s{i}.nii.gz", RNG.normal(size=SHAPE).astype(np.float32))
        rows.append([f"s{i}", f"s{i}.nii.gz", "atlas.nii.gz", "atlas_mask.nii.gz"])
    specs = read_manifest(make_manifest(tmp_path, rows, header="subject_id,source,target,target_mask"))
    store = tmp_path / "cohort.zarr"
    open_cohort(store)  # as a run does before its workers start
    with ThreadPoolExecutor(6) as pool:  # side by side, as workers ingest: one copy of the atlas survives
        outcomes = list(pool.map(lambda s: ingest_pair(s, store), specs))
    assert {o.status for o in outcomes} == {"ingested"}
    volumes = sorted(p.name for p in (store / "volumes").iterdir() if p.is_dir())
    assert len(volumes) == 6 + 2 and not [v for v in volumes if v.startswith(".tmp")]  # 6 subjects, atlas, mask
    for spec in specs:
        got = read_pair(store, spec.pair_id)
        np.testing.assert_array_equal(got["target"].data, atlas)
        assert got["source"].attrs["path"] == str(spec.source)
        assert set(got) == {"source", "target", "target_mask"}
        assert not any((store / "pairs" / spec.pair_id).glob("source"))  # no per-pair copy
    volume_bytes = sum(f.stat().st_size for f in (store / "volumes").rglob("*") if f.is_file())
    one = sum(f.stat().st_size for f in (store / "volumes" / volumes[0]).rglob("*") if f.is_file())
    assert volume_bytes < 9 * one  # about one input volume per pair (+ the atlas and its mask once)


def test_a_shared_file_is_read_once_per_process_and_again_when_it_changes(tmp_path, monkeypatch):
    from equiqc.storage import cohort

    monkeypatch.setattr(cohort, "_LOADED", OrderedDict())
    read, real = [], cohort.load_volume
    monkeypatch.setattr(cohort, "load_volume", lambda path, dtype: read.append(path.name) or real(path, dtype))
    atlas = RNG.normal(size=SHAPE).astype(np.float32)
    write_nii(tmp_path / "atlas.nii.gz", atlas)
    for i in range(4):
        write_nii(tmp_path / f"s{i}.nii.gz", RNG.normal(size=SHAPE).astype(np.float32))
    specs = read_manifest(make_manifest(tmp_path, [[f"s{i}", f"s{i}.nii.gz", "atlas.nii.gz"] for i in range(4)]))
    store = tmp_path / "cohort.zarr"
    kept = [ingest_and_keep(spec, store)[1] for spec in specs[:3]]
    assert sorted(read) == ["atlas.nii.gz", "s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]  # the atlas once
    kept[0]["target"].data[:] = 0  # each pair gets its own copy: a change does not reach the next pair
    for volumes in kept[1:]:
        np.testing.assert_array_equal(volumes["target"].data, atlas)
    write_nii(tmp_path / "atlas.nii.gz", 2 * atlas)  # new content under the same path: read again
    os.utime(tmp_path / "atlas.nii.gz", ns=(1, 1))
    np.testing.assert_array_equal(ingest_and_keep(specs[3], store)[1]["target"].data, 2 * atlas)
    assert read.count("atlas.nii.gz") == 2
    monkeypatch.setattr(cohort, "LOADED_CACHE_BYTES", atlas.nbytes)  # room for one volume: the oldest go
    write_nii(tmp_path / "s4.nii.gz", RNG.normal(size=SHAPE).astype(np.float32))
    ingest_and_keep(dataclasses.replace(specs[0], source=tmp_path / "s4.nii.gz", pair_id="s4"), store)
    assert read[-2:] == ["s4.nii.gz", "atlas.nii.gz"] and len(cohort._LOADED) == 1  # s4 dropped for the atlas
    monkeypatch.setattr(cohort, "LOADED_CACHE_BYTES", 2**30)
    monkeypatch.setattr(cohort, "LOADED_CACHE_VOLUMES", 2)  # and a few volumes, whatever their size
    for i in range(3):
        ingest_and_keep(dataclasses.replace(specs[0], source=tmp_path / f"s{i}.nii.gz", pair_id=f"n{i}"), store)
    assert len(cohort._LOADED) == 2


def test_a_store_written_before_content_addressing_is_still_read(tmp_path):
    store = tmp_path / "cohort.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3).require_group("pairs").create_group("old")
    for role in ("source", "target"):
        arr = group.create_array(role, shape=SHAPE, dtype=np.float32)
        arr[...] = np.full(SHAPE, 2.0 if role == "source" else 3.0, np.float32)
        arr.attrs.update({"affine": np.eye(4).tolist()})
    group.attrs.update({"status": "ok", "roles": ["source", "target"]})
    got = read_pair(store, "old")
    assert got["source"].data[0, 0, 0] == 2.0 and got["target"].data[0, 0, 0] == 3.0


def bad_inputs(tmp_path):
    """name -> (file writer, expected message fragment) for each validation failure."""
    good = RNG.normal(size=SHAPE).astype(np.float32)

    def truncated(p):
        write_nii(p, good)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def not_nifti(p):
        with gzip.open(p, "wb") as fh:
            fh.write(b"this is not an image")

    def singular(p):
        # nibabel recomputes a valid header on save, so patch the bytes: sform only, with srow_z = 0.
        img = nib.Nifti1Image(good, np.eye(4))
        img.header.set_qform(None, code=0)
        img.header.set_sform(np.eye(4), code=1)
        raw = bytearray(img.header.binaryblock + b"\0" * 4 + good.tobytes(order="F"))
        raw[312:328] = np.zeros(4, np.float32).tobytes()  # srow_z: a flat third axis
        with gzip.open(p, "wb") as fh:
            fh.write(bytes(raw))

    nan = good.copy()
    nan[1, 2, 3] = np.nan
    inf = good.copy()
    inf[0, 0, 0] = np.inf
    return {
        "missing": (None, "file not found"),
        "truncated": (truncated, "not a readable NIfTI"),
        "not_nifti": (not_nifti, "not a readable NIfTI"),
        "2d": (lambda p: write_nii(p, good[:, :, 0]), "expected a 3D volume"),
        "4d": (lambda p: write_nii(p, np.stack([good, good], -1)), "expected a 3D volume"),
        "nan": (lambda p: write_nii(p, nan), "NaN or infinite"),
        "inf": (lambda p: write_nii(p, inf), "NaN or infinite"),
        "constant": (lambda p: write_nii(p, np.ones(SHAPE, np.float32)), "constant"),
        "zero_axis": (lambda p: write_nii(p, np.zeros((4, 0, 3), np.float32)), "zero-length axis"),
        "singular": (singular, "singular or non-finite affine"),
    }


def test_each_bad_input_fails_its_pair_only(tmp_path):
    cohort_files(tmp_path)
    rows = [["ok", "src.nii.gz", "tgt.nii.gz"]]
    cases = bad_inputs(tmp_path)
    for name, (writer, _) in cases.items():
        if writer is not None:
            writer(tmp_path / f"{name}.nii.gz")
        rows.append([name, f"{name}.nii.gz", "tgt.nii.gz"])
    specs = read_manifest(make_manifest(tmp_path, rows))
    store = tmp_path / "cohort.zarr"
    outcomes = {s.subject_id: ingest_pair(s, store) for s in specs}
    assert outcomes["ok"].status == "ingested"
    for name, (_, message) in cases.items():
        assert outcomes[name].status == "failed", name
        assert message in outcomes[name].error, (name, outcomes[name].error)
        assert f"{name}.nii.gz" in outcomes[name].error
        assert pair_status(store, specs[0].pair_id)["status"] == "ok"
    # a failed pair stays failed without re-reading when its files are unchanged
    assert ingest_pair(specs[1], store).status == "failed"


def test_mask_on_another_grid_and_memory_guard(tmp_path):
    cohort_files(tmp_path)
    write_nii(tmp_path / "small_mask.nii.gz", np.ones((5, 5, 5), np.uint8))
    spec = read_manifest(make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz", "small_mask.nii.gz"]],
                                       header="subject_id,source,target,source_labels"))[0]
    out = ingest_pair(spec, tmp_path / "c.zarr")
    assert out.status == "failed" and "not on the source image's grid" in out.error
    spec = read_manifest(make_manifest(tmp_path, [["s1", "src.nii.gz", "tgt.nii.gz"]]))[0]
    out = ingest_pair(spec, tmp_path / "d.zarr", max_voxels=100)
    assert out.status == "failed" and "memory guard" in out.error


# ------------------------------------------------------------------------------------------------ results


def fake_result(shape, std=None, split=False) -> UncertaintyResult:
    comps = components(3)
    cov = RNG.random((6, *shape)).astype(np.float32)
    return UncertaintyResult(
        std_mm=(RNG.random(shape) if std is None else std).astype(np.float32), covariance_mm2=cov,
        components=comps, mean_map=RNG.random((3, *shape)).astype(np.float32),
        prediction_map=RNG.random((3, *shape)).astype(np.float32),
        n_valid=np.full(shape, 8, np.int32), n_samples=8,
        intrinsic_spread_mm2=cov / 2 if split else None, bias_jitter_mm2=cov / 2 if split else None)


def test_result_store_is_xarray_readable_with_mm_coordinates(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 0]
    res = fake_result(SHAPE, split=True)
    R.write_result(tmp_path / "r.zarr", "p1", res, affine, {"k": 8}, level="full")
    other = fake_result(SHAPE)
    R.write_result(tmp_path / "r.zarr", "p2", other, affine, {"k": 8}, level="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain xarray call opens without a warning: named dims, no coordinates
        plain = xr.open_zarr(tmp_path / "r.zarr", group="p1", consolidated=False)
        ds = R.open_pair(tmp_path / "r.zarr", "p1")  # the coordinates, derived from the affine
    assert plain["std_mm"].dims == ("x", "y", "z") and "x" not in plain.coords
    np.testing.assert_array_equal(plain["std_mm"].values, res.std_mm)
    assert ds["std_mm"].dims == ("x", "y", "z")
    assert ds["covariance_mm2"].dims == ("component", "x", "y", "z")
    assert list(ds["component"].values) == ["xx", "yy", "zz", "xy", "xz", "yz"]
    np.testing.assert_array_equal(ds["covariance_mm2"].sel(component="xy").values, res.covariance_mm2[3])
    assert ds["mean_map"].dims == ("axis", "x", "y", "z") and list(ds["axis"].values) == ["i", "j", "k"]
    assert ds["covariance_mm2"].attrs["units"] == "mm2" and ds["n_valid"].attrs["units"] == "1"
    assert all(ds[v].attrs.get("long_name") for v in ds.data_vars)
    tree = R.open_cohort_results(tmp_path / "r.zarr")  # the whole cohort as one DataTree
    assert set(tree.children) == {"p1", "p2"}
    np.testing.assert_array_equal(tree["p2"].to_dataset()["std_mm"].values, other.std_mm)
    np.testing.assert_allclose(tree["p2"].to_dataset()["y"].values, 5 + 2 * np.arange(SHAPE[1]))
    assert list(tree["p1"].to_dataset()["component"].values) == ["xx", "yy", "zz", "xy", "xz", "yz"]
    assert "intrinsic_spread_mm2" not in tree["p2"].to_dataset()
    np.testing.assert_allclose(ds["x"].values, -10 + 2 * np.arange(SHAPE[0]))
    np.testing.assert_allclose(ds["z"].values, 3 * np.arange(SHAPE[2]))
    assert ds["std_mm"].attrs["units"] == "mm"
    np.testing.assert_array_equal(ds["std_mm"].values, res.std_mm)
    assert "intrinsic_spread_mm2" in ds and "bias_jitter_mm2" in ds


def test_arrays_are_chunked_by_64_voxels_and_empty_chunks_skipped_only_when_asked(tmp_path):
    assert chunks_for((100, 64, 3)) == (64, 64, 3)
    assert chunks_for((6, 130, 20, 70)) == (6, 64, 20, 64)  # a leading axis (components) whole
    data = np.zeros((70, 8, 8), np.float32)
    data[64:] = 1  # the first chunk holds only the fill value
    kept = write_array(tmp_path / "kept", data, {"units": "mm"}, skip_empty_chunks=False, fill_value=0)
    skipped = write_array(tmp_path / "skipped", data, {"units": "mm"}, fill_value=0)
    assert kept.chunks == skipped.chunks == (64, 8, 8) and kept.attrs["units"] == "mm"
    assert kept.nchunks_initialized == 2 and skipped.nchunks_initialized == 1
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "skipped", mode="r")[...], data)
    with pytest.raises(zarr.errors.ContainsArrayError):  # never over an existing array
        write_array(tmp_path / "kept", data, {})
    res = fake_result((70, 9, 66))
    R.write_result(tmp_path / "r.zarr", "p", res, np.eye(4), {"k": 1}, level="full")
    group = zarr.open_group(tmp_path / "r.zarr" / "p", mode="r")
    assert group["std_mm"].chunks == (64, 9, 64) and group["mean_map"].chunks == (3, 64, 9, 64)
    np.testing.assert_array_equal(group["mean_map"][...], res.mean_map)
    R.write_result(tmp_path / "r.zarr", "p", res, np.eye(4), {"k": 1}, level="minimal")  # rewritten: old arrays go
    assert sorted(zarr.open_group(tmp_path / "r.zarr" / "p", mode="r").array_keys()) == ["n_valid", "std_mm"]


def test_half_written_and_mismatched_results_are_detected(tmp_path):
    root = tmp_path / "r.zarr"
    assert R.status(root, "p1") == "missing"
    R.write_result(root, "p1", fake_result(SHAPE), np.eye(4), {"k": 8, "model": "a"})
    assert R.status(root, "p1", {"k": 8, "model": "a"}) == "complete"
    R.invalidate(root, "p1")  # as if the writer died before the marker
    assert R.status(root, "p1", {"k": 8, "model": "a"}) == "incomplete"
    R.write_result(root, "p1", fake_result(SHAPE), np.eye(4), {"k": 8, "model": "a"})
    assert R.status(root, "p1", {"k": 16, "model": "a"}) == "mismatch"
    with pytest.raises(R.ResultConfigMismatch, match="k: stored 8 vs now 16"):
        R.write_result(root, "p1", fake_result(SHAPE), np.eye(4), {"k": 16, "model": "a"})
    R.write_result(root, "p1", fake_result(SHAPE), np.eye(4), {"k": 16, "model": "a"}, overwrite=True)
    assert R.status(root, "p1", {"k": 16, "model": "a"}) == "complete"


# ------------------------------------------------------------------------------------------------- report


def test_report_schema_subject_table_and_atomic_write(tmp_path):
    rows = [
        {"subject_id": "s1", "pair_id": "a", "status": "complete", "risk_score": 0.5, "flagged": False,
         "uncertainty_mean_mm": 0.4, "n_samples": 8, "model": "m", "seed": 0, "uncertainty_mean_mm_gm": 0.3},
        {"subject_id": "s1", "pair_id": "b", "status": "complete", "risk_score": 3.0, "flagged": True,
         "uncertainty_mean_mm": 1.4, "n_samples": 8, "model": "m", "seed": 0},
        {"subject_id": "s2", "pair_id": "c", "status": "failed", "error": "source x: file not found"},
    ]
    report, subjects = write_report(rows, tmp_path / "out")
    frame = pd.read_parquet(report)
    assert list(frame.columns[: len(SCHEMA)]) == list(SCHEMA)
    assert frame.columns[-1] == "uncertainty_mean_mm_gm"
    assert str(frame["risk_score"].dtype) == "float64" and str(frame["flagged"].dtype) == "bool"
    assert len(frame) == 3 and frame.loc[2, "error"] == "source x: file not found"
    table = pq.read_table(report)
    assert table.schema.field("n_samples").type == "int64"
    subj = pd.read_parquet(subjects).set_index("subject_id")
    assert subj.loc["s1", "pair_id"] == "b" and subj.loc["s1", "n_flagged"] == 1
    assert subj.loc["s2", "n_failed"] == 1
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


@pytest.mark.parametrize("level", ["minimal", "standard", "full"])
def test_storage_levels_keep_what_they_promise(tmp_path, level):
    from equiqc.storage.levels import STORE_LEVELS

    result = fake_result(SHAPE)
    result.prediction_map = (np.indices(SHAPE, dtype=np.float32) + RNG.normal(0, 3, (3, *SHAPE))).astype(np.float32)
    R.write_result(tmp_path / "r.zarr", "p", result, np.eye(4), {"k": 8}, level=level)
    group = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["p"]
    stored = {k for k, _ in group.arrays()} - {"x", "y", "z", "component", "axis"}
    # not stochastic; error_mm only when it is given (a calibration's voxel model made it)
    assert stored == set(STORE_LEVELS[level]) - {"intrinsic_spread_mm2", "bias_jitter_mm2", "error_mm"}
    error = RNG.random(SHAPE).astype(np.float32)
    R.write_result(tmp_path / "e.zarr", "p", result, np.eye(4), {"k": 8}, level=level, arrays={"error_mm": error})
    assert np.array_equal(R.read_array(tmp_path / "e.zarr", "p", "error_mm")[0], error)
    with pytest.raises(R.ResultNotFound, match="error_mm is stored when the run's calibration has a voxel model"):
        R.read_array(tmp_path / "r.zarr", "p", "error_mm")
    assert group["n_valid"].dtype == np.uint16 and R.read_marker(tmp_path / "r.zarr", "p")["store"] == level
    if level == "minimal":
        with pytest.raises(R.ResultNotFound, match="stored at level 'minimal'; --store full keeps every array"):
            R.read_array(tmp_path / "r.zarr", "p", "prediction_map")
    else:  # the map comes back from the float16 displacement within float16 rounding
        pred, _ = R.read_array(tmp_path / "r.zarr", "p", "prediction_map")
        np.testing.assert_allclose(pred, result.prediction_map, atol=0.01 if level == "standard" else 0)


def test_a_result_kept_at_a_higher_level_is_complete_and_a_lower_one_is_recomputed(tmp_path):
    root = tmp_path / "r.zarr"
    R.write_result(root, "p", fake_result(SHAPE), np.eye(4), {"k": 8, "store": "standard"}, level="standard")
    assert R.status(root, "p", {"k": 8, "store": "minimal"}) == "complete"
    assert R.status(root, "p", {"k": 8, "store": "full"}) == "stale"  # covariance and maps missing: recompute
    assert R.status(root, "p", {"k": 16, "store": "minimal"}) == "mismatch"  # another K is another configuration
    R.write_result(root, "old", fake_result(SHAPE), np.eye(4), {"k": 8}, level="full")  # marker from before levels
    assert R.status(root, "old", {"k": 8, "store": "standard"}) == "complete"
