"""workflows/: configuration, cluster construction, and end-to-end runs on a real LocalCluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from distributed import Client, LocalCluster

from equiqc.pipeline.backends.registry import model_defaults
from equiqc.storage import results as R
from equiqc.workflows.cli import main
from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import ConfigError, RunConfig, make_config
from equiqc.workflows.demo import build_demo_cohort, demo_summary
from equiqc.workflows.run import rebuild_report, run_cohort

# ------------------------------------------------------------------------------------------- configuration


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("samples: 8\nbatch-size: 2\nperturbation: affine\ncluster_options: {queue: gpu}\n")
    cfg = make_config(tmp_path / "c.yaml", samples=12, model=None)
    assert (cfg.samples, cfg.batch_size, cfg.perturbation, cfg.cluster_options) == (12, 2, "affine", {"queue": "gpu"})
    (tmp_path / "c.toml").write_text('method = "mc-dropout"\nseed = 3\n')
    cfg = make_config(tmp_path / "c.toml")
    assert cfg.method == "mc-dropout" and cfg.perturbation_config().kind == "none"
    (tmp_path / "bad.yaml").write_text("sample: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'sample'"):
        make_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="option method"):
        RunConfig(method="bayes")
    with pytest.raises(ConfigError, match="samples"):
        RunConfig(samples=0)


def test_model_defaults_sit_under_the_config_file_and_flags(tmp_path):
    recommended = model_defaults("multipropreg")["perturbation"]
    assert recommended != RunConfig().perturbation
    assert make_config(model="multipropreg").perturbation == recommended
    assert make_config(model="default").perturbation == RunConfig().perturbation
    assert make_config(model="multipropreg", perturbation="affine").perturbation == "affine"
    (tmp_path / "c.yaml").write_text("model: multipropreg\nperturbation: rigid\n")
    assert make_config(tmp_path / "c.yaml").perturbation == "rigid"
    (tmp_path / "m.yaml").write_text("model: multipropreg\n")
    assert make_config(tmp_path / "m.yaml").perturbation == recommended


def test_cli_stops_on_a_bad_manifest(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("subject_id,source\ns1,a.nii\n")
    assert main(["run", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "missing required column 'target'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return build_demo_cohort(out, pairs=4, seed=1, failure_fraction=0.25)


def local(workers: int) -> ClusterHandle:
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=":0")
    return ClusterHandle(Client(cluster), cluster, False)


CFG = dict(samples=2, batch_size=2, label_names={1: "csf", 2: "gm", 3: "wm"})


def stored(out, name="std_mm"):
    root = zarr.open_group(str(out / "results.zarr"), mode="r")
    return {k: root[k][name][...] for k in sorted(root.group_keys())}


@pytest.mark.slow
def test_end_to_end_two_workers_equals_one_worker_and_resume_recomputes_one_pair(cohort, tmp_path):
    out2, out1 = tmp_path / "two", tmp_path / "one"
    handle = local(2)
    try:
        first = run_cohort(cohort.manifest, out2, RunConfig(**CFG), handle)
    finally:
        handle.close()
    report = pd.read_parquet(out2 / "report.parquet")
    assert len(report) == 4 and list(report["pair_id"]) == [f"sub-00{i}_to_atlas" for i in range(1, 5)]
    assert (report["status"] == "complete").all() and first.computed == 4
    assert np.isfinite(report["true_error_mean_mm"]).all() and "uncertainty_mean_mm_gm" in report
    stats = demo_summary(first.rows, cohort.truth)
    assert stats["injected"] == 1

    handle = local(1)
    try:
        run_cohort(cohort.manifest, out1, RunConfig(**CFG), handle)
        a, b = stored(out2), stored(out1)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])  # determinism: same seed, same numbers, any worker count
        # resume: drop one pair's completion marker -> exactly that pair is recomputed
        R.invalidate(out1 / "results.zarr", "sub-002_to_atlas")
        again = run_cohort(cohort.manifest, out1, RunConfig(**CFG), handle)
        assert again.computed == 1
        pd.testing.assert_frame_equal(
            pd.read_parquet(out1 / "report.parquet").drop(columns="runtime_s"),
            pd.read_parquet(out2 / "report.parquet").drop(columns="runtime_s"), check_exact=False, rtol=1e-6)
        # a run of another configuration is refused, and report rebuild needs no compute
        with pytest.raises(ConfigError, match="differs in: samples"):
            run_cohort(cohort.manifest, out1, RunConfig(**{**CFG, "samples": 5}), handle)
    finally:
        handle.close()
    rebuilt = rebuild_report(out1)
    assert [r["status"] for r in rebuilt.rows] == ["complete"] * 4


@pytest.mark.slow
def test_cli_run_report_export(cohort, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["run", str(cohort.manifest), "--out", str(out), "--samples", "2", "--workers", "2",
                 "--perturbation", "translation"]) == 0
    text = capsys.readouterr().out
    assert "pairs: 4 (4 complete, 0 failed, 4 computed this run)" in text and "report:" in text
    assert main(["report", str(out)]) == 0
    assert main(["export", str(out), "--pair", "sub-001_to_atlas", "--to", str(tmp_path / "nii"),
                 "--arrays", "std_mm,prediction_map"]) == 0
    assert (tmp_path / "nii" / "sub-001_to_atlas_std_mm.nii.gz").exists()
    assert (tmp_path / "nii" / "sub-001_to_atlas_prediction_map_xfm.nii.gz").exists()


def test_a_task_that_dies_is_split_and_only_its_bad_pair_fails_with_its_traceback(tmp_path, monkeypatch):
    """A task of three pairs that dies past its retries (as one whose worker kept crashing would) is run again as
    one task per pair: the pairs it had written come back complete from their markers, the pair that kills its
    task becomes a failed row with the error and a crash file holding the traceback."""
    from cohorts import NEAR_FREE_MODEL, tiny_cohort

    from equiqc.workflows import run as run_module

    manifest = tiny_cohort(tmp_path / "in", pairs=3)
    real, log = run_module.pairs_task, tmp_path / "tasks.txt"

    def dies_with_the_second(specs, *args):  # (the task is a copy on the worker: it logs to a file)
        with open(log, "a") as fh:
            fh.write(" ".join(s.subject_id for s in specs) + "\n")
        rows = real([s for s in specs if not s.subject_id.endswith("1")], *args)  # written before the task dies
        if any(s.subject_id.endswith("1") for s in specs):
            raise RuntimeError("the worker died")
        return rows

    monkeypatch.setattr(run_module, "pairs_task", dies_with_the_second)
    monkeypatch.setattr(run_module, "pairs_per_task", lambda pairs, workers: 3)
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, False)
    try:
        summary = run_cohort(manifest, tmp_path / "out", RunConfig(model=NEAR_FREE_MODEL, samples=2, retries=0),
                             handle)
    finally:
        handle.close()
    tasks = log.read_text().splitlines()
    assert tasks[0] == "sub-000 sub-001 sub-002" and sorted(tasks[1:]) == ["sub-000", "sub-001", "sub-002"]
    assert [r["status"] for r in summary.rows] == ["complete", "failed", "complete"]
    assert [r.get("_computed") for r in summary.rows if r["status"] == "complete"] == [None, None]  # popped
    assert summary.computed == 1  # the failed pair; the two others were found complete when run alone
    died = summary.failed[0]
    assert died["subject_id"] == "sub-001" and died["error"] == "RuntimeError: the worker died"
    crash = (tmp_path / "out" / died["crash_file"]).read_text()
    assert "dies_with_the_second" in crash and "RuntimeError: the worker died" in crash


def test_pairs_per_task_batches_only_large_cohorts_of_the_workers_planned():
    from equiqc.workflows.run import MAX_PAIRS_PER_TASK, TASKS_PER_WORKER, expected_workers, pairs_per_task

    assert pairs_per_task(4, 2) == 1 and pairs_per_task(0, 0) == 1
    assert pairs_per_task(2000, 2) == MAX_PAIRS_PER_TASK
    assert pairs_per_task(TASKS_PER_WORKER * 2 * 3, 2) == 3  # every worker still gets TASKS_PER_WORKER tasks
    # workers asked for but not yet connected (jobs in a queue) count: the batches are sized for them
    cluster = LocalCluster(n_workers=0, processes=False, dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, False)
    try:
        cluster.scale(3)
        assert expected_workers(handle) == 3
        assert expected_workers(ClusterHandle(handle.client, None, False)) >= 1  # an external scheduler
    finally:
        handle.close()
