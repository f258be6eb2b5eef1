"""workflows/: configuration, cluster construction, and end-to-end runs on a real LocalCluster."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pandas as pd
import pytest
import zarr
from distributed import Client, LocalCluster

from storage import results as R
from workflows import cluster as C
from workflows.cli import main
from workflows.cluster import ClusterHandle, cluster_kwargs, make_cluster
from workflows.config import MODEL_DEFAULTS, ConfigError, RunConfig, make_config
from workflows.demo import build_demo_cohort, demo_summary
from workflows.run import OutputLock, RunLocked, rebuild_report, run_cohort

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
    with pytest.raises(ConfigError, match="--method"):
        RunConfig(method="bayes")
    with pytest.raises(ConfigError, match="samples"):
        RunConfig(samples=0)


def test_model_defaults_sit_under_the_config_file_and_flags(tmp_path):
    recommended = MODEL_DEFAULTS["multipropreg"]["perturbation"]
    assert recommended != RunConfig().perturbation
    assert make_config(model="multipropreg").perturbation == recommended
    assert make_config(model="default").perturbation == RunConfig().perturbation
    assert make_config(model="multipropreg", perturbation="affine").perturbation == "affine"
    (tmp_path / "c.yaml").write_text("model: multipropreg\nperturbation: rigid\n")
    assert make_config(tmp_path / "c.yaml").perturbation == "rigid"
    (tmp_path / "m.yaml").write_text("model: multipropreg\n")
    assert make_config(tmp_path / "m.yaml").perturbation == recommended


def test_cluster_arguments_bind_to_localhost():
    kind, kw = cluster_kwargs(RunConfig(workers=3))
    assert kind == "local" and kw["n_workers"] == 3 and kw["threads_per_worker"] == 1
    assert kw["host"] == "127.0.0.1" and kw["dashboard_address"].startswith("127.0.0.1")
    kind, kw = cluster_kwargs(RunConfig(cluster="cuda", cluster_options={"CUDA_VISIBLE_DEVICES": "0,1"}))
    assert kind == "cuda" and kw["resources"] == {"GPU": 1} and kw["CUDA_VISIBLE_DEVICES"] == "0,1"
    kind, kw = cluster_kwargs(RunConfig(cluster="slurm", cluster_options={"queue": "gpu", "walltime": "02:00:00"}))
    assert kind == "slurm" and kw["queue"] == "gpu" and kw["scheduler_options"]["host"] == "127.0.0.1"


class Recorder:
    def __init__(self, **kwargs):
        self.kwargs, self.scaled, self.closed = kwargs, None, False

    def scale(self, jobs):
        self.scaled = jobs

    def close(self):
        self.closed = True


def test_cuda_and_jobqueue_clusters_are_built_with_their_options(monkeypatch):
    # No GPU and no SLURM here: the cluster classes are stand-ins that record what they were given.
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=Recorder))
    monkeypatch.setitem(sys.modules, "dask_jobqueue", types.SimpleNamespace(SLURMCluster=Recorder, PBSCluster=Recorder))
    monkeypatch.setattr(C, "Client", lambda cluster: types.SimpleNamespace(cluster=cluster, close=lambda: None))
    handle = make_cluster(RunConfig(cluster="cuda", workers=2))
    assert handle.gpu and handle.cluster.kwargs["n_workers"] == 2 and handle.cluster.kwargs["resources"] == {"GPU": 1}
    handle = make_cluster(RunConfig(cluster="pbs", workers=4, cluster_options={"queue": "long"}))
    assert not handle.gpu and handle.cluster.scaled == 4 and handle.cluster.kwargs["queue"] == "long"


def test_missing_gpu_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with pytest.raises(ConfigError, match=r"equiqc\[gpu\]"):
        make_cluster(RunConfig(cluster="cuda"))


def test_output_lock(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(RunLocked, match="in use by another equiqc run"):
            OutputLock(tmp_path).__enter__()
    (tmp_path / ".equiqc.lock").write_text("999999999")  # a dead process's lock is taken over
    with OutputLock(tmp_path):
        assert (tmp_path / ".equiqc.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".equiqc.lock").exists()


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


CFG = dict(samples=4, batch_size=4, label_names={1: "csf", 2: "gm", 3: "wm"})


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
