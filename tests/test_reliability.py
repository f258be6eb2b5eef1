"""Reliability: bad inputs, killed workers, killed runs, failed writes, concurrent runs. Nothing is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr
from anatomy import moved_template
from distributed import Client, LocalCluster

from equiqc.storage import results as R
from equiqc.storage.manifest import write_manifest
from equiqc.workflows.cli import main
from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import RunConfig
from equiqc.workflows.run import run_cohort
from tests.test_storage import bad_inputs

CFG = dict(samples=3)  # batch size: the device default, as the CLI run below uses


def small_cohort(folder: Path, n: int = 4) -> Path:
    """n good subject->template pairs at 4 mm (50 x 59 x 48), each moved differently."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        src, tgt, affine, _, brain = moved_template(4, degrees=(2.0 * i, -1.0, 1.0), shift_mm=(i, 2.0, -1.0))
        nib.save(nib.Nifti1Image(tgt, affine), str(folder / f"s{i}.nii.gz"))
        rows.append({"subject_id": f"s{i}", "pair_id": f"p{i}", "source": f"s{i}.nii.gz", "target": "tpl.nii.gz"})
    nib.save(nib.Nifti1Image(src, affine), str(folder / "tpl.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(folder / "mask.nii.gz"))
    write_manifest(folder / "manifest.csv", rows)
    return folder / "manifest.csv"


def local(workers: int = 2, processes: bool = True) -> ClusterHandle:
    where = {"host": "127.0.0.1"} if processes else {}  # in-process workers talk over inproc://
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=":0",
                           **where)
    return ClusterHandle(Client(cluster), cluster, False)


def stored(out: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(out / "results.zarr"), mode="r")
    return {k: root[k]["std_mm"][...] for k in sorted(root.group_keys())}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean reference run of the small cohort."""
    base = tmp_path_factory.mktemp("clean")
    manifest = small_cohort(base / "data")
    handle = local(2)
    try:
        run_cohort(manifest, base / "out", RunConfig(**CFG), handle)
    finally:
        handle.close()
    return manifest, base / "out"


# ------------------------------------------------------------------------------------------------ inputs


@pytest.mark.slow
def test_every_bad_input_is_a_clear_per_pair_error_and_the_rest_complete(tmp_path, capsys):
    data = tmp_path / "data"
    manifest = small_cohort(data, n=1)
    rows = [{"subject_id": "s0", "pair_id": "p0", "source": "s0.nii.gz", "target": "tpl.nii.gz"}]
    bad = bad_inputs(data)
    cases = {name: msg for name, (_, msg) in bad.items()}
    for name, (writer, _) in bad.items():
        if writer is not None:
            writer(data / f"{name}.nii.gz")
        rows.append({"subject_id": name, "pair_id": name, "source": f"{name}.nii.gz", "target": "tpl.nii.gz"})
    # a mask on another grid, a volume over the memory guard, fields of view that do not overlap
    nib.save(nib.Nifti1Image(np.ones((9, 9, 9), np.uint8), np.eye(4)), str(data / "small_mask.nii.gz"))
    rows.append({"subject_id": "grid", "pair_id": "grid", "source": "s0.nii.gz", "target": "tpl.nii.gz",
                 "target_mask": "small_mask.nii.gz"})
    cases["grid"] = "not on the target image's grid"
    big = np.random.default_rng(0).random((120, 120, 120)).astype(np.float32)
    nib.save(nib.Nifti1Image(big, np.diag([4.0, 4, 4, 1])), str(data / "big.nii.gz"))
    rows.append({"subject_id": "big", "pair_id": "big", "source": "big.nii.gz", "target": "tpl.nii.gz"})
    cases["big"] = "memory guard"
    far = nib.load(str(data / "s0.nii.gz"))
    far_affine = far.affine.copy()
    far_affine[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(np.asarray(far.dataobj), far_affine), str(data / "far.nii.gz"))
    rows.append({"subject_id": "far", "pair_id": "far", "source": "far.nii.gz", "target": "tpl.nii.gz"})
    cases["far"] = "fields of view overlap in only 0.0 %"
    write_manifest(manifest, rows)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), "--samples", "2", "--workers", "2",
                 "--max-voxels", "1000000"]) == 0
    report = pd.read_parquet(out / "report.parquet").set_index("pair_id")
    assert len(report) == len(rows)
    assert report.loc["p0", "status"] == "complete"
    for name, message in cases.items():
        assert report.loc[name, "status"] == "failed", name
        assert message in report.loc[name, "error"], (name, report.loc[name, "error"])
    assert "failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.slow
def test_a_worker_killed_mid_estimation_loses_nothing(clean, tmp_path):
    manifest, reference = clean
    handle = local(2)
    killed = []

    def killer():
        # wait until a pair task (ingest, estimate, write) is running on a worker, then SIGKILL that worker's process
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            processing = handle.client.processing()
            busy = [w for w, keys in processing.items() if any(str(k).startswith("pair-") for k in keys)]
            if busy:
                pid = handle.client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    import threading

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        summary = run_cohort(manifest, tmp_path / "out", RunConfig(**CFG), handle)
    finally:
        thread.join()
        handle.close()
    assert killed, "no worker was killed"
    print(f"RELIABILITY worker SIGKILL: pid {killed[0]} killed mid-estimation; 4 of 4 pairs complete, arrays equal")
    assert [r["status"] for r in summary.rows] == ["complete"] * 4
    a, b = stored(tmp_path / "out"), stored(reference)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_a_killed_run_resumes_only_incomplete_pairs_and_a_second_run_is_refused(clean, tmp_path):
    manifest, reference = clean
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "equiqc.workflows.cli", "run", str(manifest), "--out", str(out), "--samples", "3",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (out / ".equiqc-locks" / "all.lock").exists():
            time.sleep(0.1)
        # a second run on the same folder is refused while the first holds it
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        assert second.returncode == 2 and "in use by another equiqc run" in second.stderr
        while time.time() < deadline and len(complete_pairs(out)) < 1:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, as a pre-empted job would be
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = complete_pairs(out)
    assert 1 <= len(done_before) < 4
    handle = local(1)
    try:
        summary = run_cohort(manifest, out, RunConfig(**CFG), handle)
    finally:
        handle.close()
    assert summary.computed == 4 - len(done_before)
    print(f"RELIABILITY killed run: {len(done_before)} of 4 pairs complete at the kill, {summary.computed} "
          "recomputed on resume, report equal to a clean run's")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "report.parquet").drop(columns="runtime_s"),
                                  pd.read_parquet(reference / "report.parquet").drop(columns="runtime_s"))


def complete_pairs(out: Path) -> list[str]:
    if not (out / "results.zarr").exists():
        return []
    return [p for p in ("p0", "p1", "p2", "p3") if R.status(out / "results.zarr", p) == "complete"]


@pytest.mark.slow
def test_a_failed_write_reports_the_pair_and_leaves_no_marker(clean, tmp_path, monkeypatch):
    manifest, _ = clean
    original = R.write_result

    def flaky(root, pair_id, *args, **kwargs):
        if pair_id == "p1":
            original(root, pair_id, *args, **kwargs)  # arrays written...
            R.invalidate(root, pair_id)  # ...but the disk fails before the marker lands
            raise OSError(28, "No space left on device")
        return original(root, pair_id, *args, **kwargs)

    monkeypatch.setattr(R, "write_result", flaky)
    handle = local(2, processes=False)  # tasks run in this process, so the injected fault applies
    try:
        summary = run_cohort(manifest, tmp_path / "out", RunConfig(**CFG), handle)
    finally:
        handle.close()
    rows = {r["pair_id"]: r for r in summary.rows}
    assert rows["p1"]["status"] == "failed" and "No space left on device" in rows["p1"]["error"]
    assert all(rows[p]["status"] == "complete" for p in ("p0", "p2", "p3"))
    assert R.status(tmp_path / "out" / "results.zarr", "p1") == "incomplete"
    monkeypatch.setattr(R, "write_result", original)
    handle = local(1, processes=False)
    try:
        again = run_cohort(manifest, tmp_path / "out", RunConfig(**CFG), handle)
    finally:
        handle.close()
    assert again.computed == 1 and all(r["status"] == "complete" for r in again.rows)
