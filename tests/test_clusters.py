"""Clusters with the real libraries: dask-jobqueue's rendered SLURM/PBS job scripts, an end-to-end cohort
through dask-jobqueue's own local cluster, external schedulers with and without GPU workers, the dask-cuda
keywords against LocalCUDACluster's signature, leases that hold across hosts, and job-array shards."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import yaml
from cohorts import NEAR_FREE_MODEL, TESTS, tiny_cohort
from distributed import Client, LocalCluster, get_task_stream

from equiqc.storage.locks import LOCK_DIR, Lease, RunLocked
from equiqc.storage.results import read_array
from equiqc.workflows import cluster as C
from equiqc.workflows.cli import main
from equiqc.workflows.cluster import ClusterHandle, cluster_kwargs, connect, make_cluster
from equiqc.workflows.config import ConfigError, RunConfig
from equiqc.workflows.demo import build_demo_cohort
from equiqc.workflows.run import parse_shard, rebuild_report, run_cohort, select_shard, shard_of

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = re.compile(r"tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+")


def documented_slurm_yaml() -> dict:
    """The documentation's own slurm.yaml, taken from its page (docs/guide/clusters.md)."""
    text = (ROOT / "docs" / "guide" / "clusters.md").read_text()
    block = re.search(r"```yaml\n# slurm.yaml\n(.*?)```", text, flags=re.S).group(1)
    return yaml.safe_load(block)


# ------------------------------------------------------------------------------------------ keyword arguments


def test_local_workers_keep_mid_size_arrays_off_mmap_and_run_no_profiler():
    handle = make_cluster(RunConfig(workers=1))
    try:
        env = list(handle.client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_",
                                                                          "MALLOC_TRIM_THRESHOLD_")}).values())[0]
        profiling = list(handle.client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values())
    finally:
        handle.close()
    assert profiling == [False]
    assert env == {"MALLOC_MMAP_THRESHOLD_": C.WORKER_ENVIRON["MALLOC_MMAP_THRESHOLD_"],
                   "MALLOC_TRIM_THRESHOLD_": str(dask.config.get("distributed.nanny.pre-spawn-environ")[
                       "MALLOC_TRIM_THRESHOLD_"])}
    assert "MALLOC_MMAP_THRESHOLD_" not in dask.config.get("distributed.nanny.pre-spawn-environ")
    assert dask.config.get("distributed.worker.profile.enabled")  # this process's configuration is left alone



def test_single_machine_clusters_bind_to_localhost():
    kind, kw = cluster_kwargs(RunConfig(workers=3))
    assert kind == "local" and kw["n_workers"] == 3 and kw["threads_per_worker"] == 1
    assert kw["host"] == "127.0.0.1" and kw["dashboard_address"].startswith("127.0.0.1")
    kind, kw = cluster_kwargs(RunConfig(cluster="cuda", cluster_options={"CUDA_VISIBLE_DEVICES": "0,1"}))
    assert kind == "cuda" and kw["resources"] == {"GPU": 1} and kw["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert kw["threads_per_worker"] == 2  # one holds the GPU, the other ingests and writes


def test_jobqueue_gets_only_what_the_user_set_and_the_workers_environment():
    kind, kw = cluster_kwargs(RunConfig(cluster="slurm", cluster_options={"queue": "gpu", "walltime": "02:00:00"}))
    assert (kind, kw) == ("slurm", {"queue": "gpu", "walltime": "02:00:00",  # no host, cores, memory, processes
                                    "job_script_prologue": C.JOB_PROLOGUE})
    _, kw = cluster_kwargs(RunConfig(cluster="pbs", cluster_options={"job_script_prologue": ["module load cuda"]}))
    assert kw["job_script_prologue"] == ["module load cuda", *C.JOB_PROLOGUE]  # the site's lines first


def test_gpu_jobs_two_threads_one_gpu_and_the_cores_still_booked():
    config = RunConfig(cluster="slurm", gpus_per_worker=1, cluster_options={"cores": 4, "memory": "32GB"})
    _, kw = cluster_kwargs(config)
    assert kw["cores"] == C.GPU_WORKER_THREADS == 2 and kw["processes"] == 1 and kw["job_cpu"] == 4
    assert kw["job_extra_directives"] == ["--gres=gpu:1"] and kw["worker_extra_args"][-2:] == ["--resources", "GPU=1"]
    _, kw = cluster_kwargs(RunConfig(cluster="pbs", gpus_per_worker=1, cluster_options={"cores": 8, "memory": "16GB"}))
    assert kw["resource_spec"].startswith("select=1:ncpus=8:mem=") and kw["resource_spec"].endswith(":ngpus=1")
    with pytest.raises(ConfigError, match="leave processes at 1"):
        cluster_kwargs(RunConfig(cluster="slurm", gpus_per_worker=1, cluster_options={"processes": 2}))
    with pytest.raises(ConfigError, match="option gpus_per_worker: 2 is not allowed"):
        RunConfig(gpus_per_worker=2)
    with pytest.raises(ConfigError, match="gpus_per_worker is for --cluster slurm/pbs.*use --cluster cuda"):
        RunConfig(gpus_per_worker=1)  # a local cluster has no GPU resource: its tasks would wait forever


def _dask_cuda_signature() -> set[str] | None:
    """Parameter names of dask_cuda.LocalCUDACluster.__init__, read from its source (importing dask_cuda needs
    CUDA); None when dask-cuda is not installed."""
    spec = importlib.util.find_spec("dask_cuda")
    if spec is None or spec.origin is None:
        return None
    tree = ast.parse((Path(spec.origin).parent / "local_cuda_cluster.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LocalCUDACluster")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert init.args.kwarg is not None  # the rest goes on to distributed.LocalCluster
    return {a.arg for a in init.args.args + init.args.kwonlyargs}


def test_dask_cuda_keywords_exist_in_local_cuda_cluster():
    names = _dask_cuda_signature()
    if names is None:
        pytest.skip("dask-cuda is not installed (README's test command installs it with --no-deps)")
    from distributed import Nanny, Worker

    # LocalCUDACluster(**kwargs) -> distributed.LocalCluster(**worker_kwargs) -> Nanny / Worker
    passed_on = {p for cls in (LocalCluster, Nanny, Worker) for p in inspect.signature(cls).parameters}
    _, kw = cluster_kwargs(RunConfig(cluster="cuda", workers=2))
    for key in kw:
        assert key in names or key in passed_on, key
    assert "CUDA_VISIBLE_DEVICES" in names and "n_workers" in names


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_cuda", None)
    with pytest.raises(ConfigError, match=r"equiqc\[gpu\]"):
        make_cluster(RunConfig(cluster="cuda"))


# ------------------------------------------------------------------------------------------ rendered job scripts


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_cohort(tmp_path_factory.mktemp("cohort"), pairs=2)


def _script(capsys, manifest, tmp_path, config: dict) -> str:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(manifest), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 2: 2 to compute, 0 already complete" in out
    assert not (tmp_path / "o" / "cohort.zarr").exists()
    return out


@pytest.mark.slow
def test_dry_run_renders_the_documented_slurm_yaml_with_gpus_and_a_reachable_scheduler(capsys, manifest, tmp_path):
    documented = documented_slurm_yaml()
    assert documented["gpus_per_worker"] == 1
    out = _script(capsys, manifest, tmp_path, documented)
    script = out.split("job script (one per job; not submitted):", 1)[1]
    for line in ("#SBATCH -p gpu", "#SBATCH -t 04:00:00", "#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:1"):
        assert line in script, line
    assert script.count("--gres") == 1  # the documented directive is kept, not doubled
    worker = next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line)
    assert "--nthreads 2" in worker and "--resources GPU=1" in worker
    address = re.search(r"dask_worker (\S+)", worker).group(1)
    assert address.startswith("tcp://") and not LOOPBACK.match(address), address


@pytest.mark.slow
def test_dry_run_renders_pbs_with_the_gpu_in_the_resource_spec(capsys, manifest, tmp_path):
    out = _script(capsys, manifest, tmp_path, {"cluster": "pbs", "gpus_per_worker": 1, "cluster_options": {
        "queue": "gpu", "cores": 4, "memory": "32GB", "walltime": "04:00:00"}})
    assert "#PBS -q gpu" in out and "#PBS -l walltime=04:00:00" in out
    assert re.search(r"#PBS -l select=1:ncpus=4:mem=\w+:ngpus=1", out), out
    worker = next(line for line in out.splitlines() if "distributed.cli.dask_worker" in line)
    assert "--resources GPU=1" in worker and not LOOPBACK.search(worker)


@pytest.mark.slow
def test_a_sites_jobqueue_yaml_applies_when_equiqc_does_not_override_it(capsys, manifest, tmp_path):
    site = {"jobqueue.slurm.account": "proj42", "jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "8GB",
            "jobqueue.slurm.queue": "site-queue"}
    with dask.config.set(site):
        out = _script(capsys, manifest, tmp_path, {"cluster": "slurm"})
    assert "#SBATCH -A proj42" in out and "#SBATCH -p site-queue" in out and "#SBATCH --cpus-per-task=2" in out


def test_missing_cores_and_memory_is_one_clear_error(manifest, tmp_path, capsys):
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        code = main(["run", str(manifest), "--out", str(tmp_path / "o"), "--cluster", "slurm", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "cluster_options" in err and "jobqueue.yaml" in err


# ------------------------------------------------------------------------------------------ real clusters


@pytest.mark.slow
def test_end_to_end_through_dask_jobqueue_local_cluster_with_gpu_resources(manifest, tmp_path, monkeypatch,
                                                                          near_free_env):
    """The jobqueue path (kwargs, scale(jobs=...), GPU resources) with dask-jobqueue's own LocalCluster standing in
    for sbatch/qsub: the "jobs" are processes here, started from the rendered job script's command."""
    from dask_jobqueue.local import LocalCluster as JobqueueLocalCluster

    monkeypatch.setattr(C, "_jobqueue_class", lambda kind: JobqueueLocalCluster)
    monkeypatch.setattr(C, "JOB_PROLOGUE", [])  # the stand-in execs the script's words: no shell, no prologue
    config = RunConfig(cluster="pbs", workers=1, gpus_per_worker=1, samples=2, batch_size=2, model=NEAR_FREE_MODEL,
                       cluster_options={"cores": 1, "memory": "4GB"})
    handle = make_cluster(config)
    try:
        assert handle.gpu
        handle.client.wait_for_workers(1, timeout=120)
        workers = handle.client.scheduler_info()["workers"].values()
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == C.GPU_WORKER_THREADS for w in workers)
        summary = run_cohort(manifest, tmp_path / "out", config, handle)
    finally:
        handle.close()
    assert [r["status"] for r in summary.rows] == ["complete", "complete"]


@pytest.mark.slow
def test_a_slurm_job_script_run_by_bash_gives_its_worker_the_local_workers_environment():
    """The SLURM job script equiqc renders, run by bash as sbatch would (its #SBATCH lines are comments): its worker
    joins the cluster's scheduler with the mmap threshold and without the profiler, as local workers have them."""
    cluster = C.build_cluster(RunConfig(cluster="slurm", cluster_options={"cores": 1, "memory": "2GB",
                                                                          "scheduler_options": {"host": "127.0.0.1"}}))
    job = None
    try:
        script = cluster.job_script()
        assert all(line in script for line in C.JOB_PROLOGUE)
        job = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            seen = client.run(lambda: (os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                                       dask.config.get("distributed.worker.profile.enabled")))
    finally:
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        cluster.close()
    assert list(seen.values()) == [(C.WORKER_ENVIRON["MALLOC_MMAP_THRESHOLD_"], False)]


@pytest.mark.slow
def test_gpu_workers_overlap_ingest_and_writes_with_estimation_and_match_the_cpu_run(tmp_path, near_free_env):
    """GPU-shaped workers (two threads, one GPU resource; the resource, not the device, shapes the graph): estimation
    tasks never run two at a time on a worker, the other thread ingests and writes meanwhile, and every pair's
    result equals the one-task-per-pair CPU run's."""
    manifest = tiny_cohort(tmp_path / "cohort", pairs=6)
    config = RunConfig(samples=4, model="python:doubles:SlowZeroDisplacement", calibration="none")
    with LocalCluster(n_workers=1, threads_per_worker=C.GPU_WORKER_THREADS, resources=dict(C.GPU_RESOURCE),
                      processes=True, host="127.0.0.1", dashboard_address=":0") as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            gpu = run_cohort(manifest, tmp_path / "gpu", config, ClusterHandle(client, None, True))
        most_at_once = list(client.run(lambda: __import__("doubles").SlowZeroDisplacement.most_at_once).values())
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        cpu = run_cohort(manifest, tmp_path / "cpu", config, ClusterHandle(client, None, False))
    assert [r["status"] for r in gpu.rows] == [r["status"] for r in cpu.rows] == ["complete"] * 6
    for row in gpu.rows:
        a, _ = read_array(tmp_path / "gpu" / "results.zarr", row["pair_id"], "std_mm")
        b, _ = read_array(tmp_path / "cpu" / "results.zarr", row["pair_id"], "std_mm")
        np.testing.assert_array_equal(a, b)
    spans = {kind: [(s["start"], s["stop"]) for t in stream.data if t["key"].startswith(kind + "-")
                    for s in t["startstops"] if s["action"] == "compute"] for kind in ("ingest", "estimate", "write")}
    assert len(spans["estimate"]) == len(spans["write"]) == len(spans["ingest"]) == 6
    # one estimation at a time on the GPU: counted by the worker itself (the task stream's times are shifted by the
    # scheduler's estimate of the worker's clock, a few milliseconds that change between tasks)
    assert most_at_once == [1]
    # the second thread worked while the GPU was busy: overlaps well beyond that shift
    overlap = [min(s[1], e[1]) - max(s[0], e[0]) for s in spans["ingest"] + spans["write"] for e in spans["estimate"]]
    assert max(overlap) > 0.01


@pytest.mark.slow
def test_external_scheduler_without_gpu_workers_says_how_to_start_them():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as plain:
        with pytest.raises(ConfigError, match=r"--resources GPU=1"):
            connect(plain.scheduler_address, gpu=True)
        client = connect(plain.scheduler_address, gpu=False)
        client.close()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as gpu:
        client = connect(gpu.scheduler_address, gpu=True)
        client.close()
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
        connect("tcp://127.0.0.1:9", gpu=False, timeout_s=2)


# ------------------------------------------------------------------------------------------ leases


def _fake_lease(out: Path, scope: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    (out / LOCK_DIR).mkdir(parents=True, exist_ok=True)
    path = out / LOCK_DIR / f"{scope}.lock"
    now = time.time()
    path.write_text(json.dumps({"host": host, "pid": pid, "scope": scope, "token": "t", "started": now - age_s,
                                "heartbeat": now - age_s}))
    return path


def test_a_live_lease_on_another_host_is_never_taken_over(tmp_path):
    _fake_lease(tmp_path, "all", "gpu-node-17", 4242)  # pid 4242 may not exist here: that must not matter
    with pytest.raises(RunLocked, match=r"host gpu-node-17, pid 4242"):
        Lease(tmp_path).__enter__()


def test_a_lease_whose_heartbeat_stopped_is_taken_over(tmp_path):
    _fake_lease(tmp_path, "all", "gpu-node-17", 4242, age_s=3600)
    with Lease(tmp_path, timeout_s=600):
        record = json.loads((tmp_path / LOCK_DIR / "all.lock").read_text())
        assert record["pid"] == os.getpid()
    assert not (tmp_path / LOCK_DIR / "all.lock").exists()


def test_a_dead_process_on_this_host_releases_its_lease(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _fake_lease(tmp_path, "all", Lease(tmp_path).host, proc.pid)
    with Lease(tmp_path):
        pass


def test_the_same_folder_is_refused_to_a_second_run_on_this_host(tmp_path):
    with Lease(tmp_path):
        with pytest.raises(RunLocked, match="in use by another equiqc run"):
            Lease(tmp_path).__enter__()
        assert len(list((tmp_path / LOCK_DIR).glob("*.lock"))) == 1  # the refused run left nothing behind


def test_shards_of_one_split_coexist_and_conflict_with_everything_else(tmp_path):
    with Lease(tmp_path, "shard-1-of-2"), Lease(tmp_path, "shard-2-of-2"):
        for scope in ("all", "shard-1-of-2", "shard-1-of-3"):
            with pytest.raises(RunLocked):
                Lease(tmp_path, scope).__enter__()


def test_the_heartbeat_renews_the_lease(tmp_path):
    with Lease(tmp_path, heartbeat_s=0.05) as lease:
        first = json.loads(lease.path.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lease.path.read_text())["heartbeat"] > first


# ------------------------------------------------------------------------------------------ shards


def test_shards_partition_the_manifest_deterministically():
    from equiqc.storage.manifest import PairSpec

    specs = [PairSpec(f"p{i}", f"s{i}", Path("a"), Path("b"), i) for i in range(200)]
    parts = [select_shard(specs, (i, 5)) for i in range(1, 6)]
    ids = [s.pair_id for part in parts for s in part]
    assert sorted(ids) == sorted(s.pair_id for s in specs) and len(set(ids)) == 200
    assert all(25 <= len(p) <= 55 for p in parts)
    assert select_shard(list(reversed(specs)), (2, 5))[::-1] == parts[1]  # order-independent membership
    assert shard_of("p7", 5) == shard_of("p7", 5)
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) is None
    for bad in ("3/2", "0/4", "a/b", "1"):
        with pytest.raises(ConfigError, match="I/N"):
            parse_shard(bad)


@pytest.fixture
def near_free_env(monkeypatch):
    """tests/ on PYTHONPATH, so workers and subprocesses can import the near-free model."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


@pytest.mark.slow
def test_two_shards_at_once_compute_every_pair_once_and_merge_into_the_unsharded_report(tmp_path, near_free_env):
    manifest = tiny_cohort(tmp_path / "cohort", pairs=6, unreadable=(4,))
    out, single = tmp_path / "sharded", tmp_path / "single"
    common = ["--samples", "3", "--batch-size", "3", "--workers", "1", "--model", NEAR_FREE_MODEL]
    cmd = [sys.executable, "-m", "equiqc.workflows.cli", "run", str(manifest), "--out", str(out), *common]
    procs = [subprocess.Popen([*cmd, "--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=near_free_env) for i in (1, 2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr
    counts = [re.search(r"pairs: (\d+) .*?(\d+) computed this run", o).groups() for o, _ in outputs]
    assert sum(int(n) for n, _ in counts) == 6 and all(int(n) > 0 for n, _ in counts), outputs  # a partition
    assert sum(int(c) for _, c in counts) == 5  # every readable pair computed exactly once (one cannot be read)
    assert not (out / "report.parquet").exists()  # shards write no report
    merged = rebuild_report(out)
    assert main(["run", str(manifest), "--out", str(single), *common]) == 0
    a = pd.read_parquet(out / "report.parquet").drop(columns="runtime_s")
    b = pd.read_parquet(single / "report.parquet").drop(columns="runtime_s")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    assert [r["status"] for r in merged.rows].count("complete") == 5
    assert "not a readable NIfTI file" in a.set_index("pair_id").loc["sub-004_sub-004_to_atlas", "error"]
    assert not list((out / LOCK_DIR).glob("*.lock"))


@pytest.mark.slow
def test_dry_run_counts_what_a_finished_run_left(tmp_path, capsys, near_free_env):
    manifest = tiny_cohort(tmp_path / "cohort", pairs=2)
    args = ["--samples", "2", "--batch-size", "2", "--workers", "1", "--model", NEAR_FREE_MODEL]
    assert main(["run", str(manifest), "--out", str(tmp_path / "o"), *args]) == 0
    capsys.readouterr()
    assert main(["run", str(manifest), "--out", str(tmp_path / "o"), *args, "--dry-run"]) == 0
    assert "pairs: 2: 0 to compute, 2 already complete" in capsys.readouterr().out


def _cuda_ready() -> str | None:
    """Why the GPU test cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    try:
        import dask_cuda  # noqa: F401
    except Exception as exc:  # installed without CUDA libraries, or not installed
        return f"dask-cuda not usable ({type(exc).__name__})"
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_cluster_cohort_matches_the_cpu_run(tmp_path):
    """--cluster cuda on a real GPU: every pair completes and std_mm matches the CPU run of the same seeds
    (GPU kernels differ in the last bits; 1e-3 mm is far below any QC decision)."""
    reason = _cuda_ready()
    if reason:
        pytest.skip(reason)
    import zarr

    cohort = build_demo_cohort(tmp_path / "cohort", pairs=4, seed=7, failure_fraction=0.0)
    args = ["--samples", "8", "--batch-size", "8"]
    assert main(["run", str(cohort.manifest), "--out", str(tmp_path / "gpu"), "--cluster", "cuda", *args]) == 0
    assert main(["run", str(cohort.manifest), "--out", str(tmp_path / "cpu"), "--workers", "2",
                 "--batch-size", "8", "--samples", "8"]) == 0
    gpu, cpu = (zarr.open_group(str(tmp_path / d / "results.zarr"), mode="r") for d in ("gpu", "cpu"))
    prov = json.loads((tmp_path / "gpu" / "run.json").read_text())["provenance"]
    assert any(d.startswith("cuda") for d in prov["devices"])
    for pair in sorted(gpu.group_keys()):
        a, b = gpu[pair]["std_mm"][...], cpu[pair]["std_mm"][...]
        assert abs(float(np.nanmedian(a)) - float(np.nanmedian(b))) < 1e-3
        np.testing.assert_allclose(a, b, atol=1e-2, equal_nan=True)


def test_local_cluster_never_puts_several_workers_on_one_gpu(monkeypatch, caplog):
    import equiqc.workflows.cluster as C

    monkeypatch.setattr(C, "cuda_device_count", lambda: 2)
    with pytest.raises(ConfigError, match="every local worker would put the model on GPU 0; use --cluster cuda"):
        cluster_kwargs(RunConfig(workers=4))
    assert cluster_kwargs(RunConfig())[1]["n_workers"] == 1
    assert "--cluster cuda runs one worker per GPU" in caplog.text
    monkeypatch.setattr(C, "cuda_device_count", lambda: 0)
    assert cluster_kwargs(RunConfig(workers=3))[1]["n_workers"] == 3
