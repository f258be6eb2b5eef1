"""Creating (or reaching) the Dask cluster a run executes on.

* ``local`` (default): ``distributed.LocalCluster`` of processes, one thread each (torch uses that one
  thread), as many workers as cores unless ``--workers``; scheduler and dashboard on 127.0.0.1 (every
  worker is on this machine). On a machine with CUDA GPUs it runs one worker (on GPU 0) and says to use
  ``cuda``; asking it for more workers there is refused, since they would all share GPU 0.
* ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker per GPU, each advertising the resource ``GPU=1``
  (estimation tasks ask for it) and running two threads (the second ingests, summarises and writes while the
  first holds the GPU); needs ``pip install 'equiqc[gpu]'`` on a machine with CUDA.
* ``slurm`` / ``pbs``: ``dask_jobqueue.SLURMCluster`` / ``PBSCluster``, scaled to ``--workers`` jobs. Only the
  options the user set in ``cluster_options`` are passed; everything else comes from dask-jobqueue's own
  configuration (``~/.config/dask/jobqueue.yaml``: ``interface``, queue, account, cores, memory...), and the
  scheduler listens where dask-jobqueue puts it (the ``interface``, else this host's address): never on a
  loopback address, which workers on compute nodes could not reach. With ``gpus_per_worker: 1`` each job
  requests one GPU (SLURM ``--gres=gpu:1``; PBS ``ngpus=1`` in the resource spec), runs one worker with two
  threads as on ``cuda`` (the job still books the ``cores`` asked for: SLURM ``--cpus-per-task``, PBS ``ncpus``;
  book at least 2), and the worker advertises ``--resources GPU=1``. Needs ``pip install 'equiqc[cluster]'``.
* ``--scheduler tcp://host:port``: an existing cluster; nothing is created. GPU tasks (``--cluster cuda`` or
  ``gpus_per_worker``) need workers started with ``--resources GPU=1``; the run checks that some worker
  advertises it and otherwise says how to start them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from equiqc.errors import require
from equiqc.workflows.config import ConfigError, RunConfig

GPU_RESOURCE = {"GPU": 1}
# Threads of a GPU worker: one holds the GPU (estimation tasks ask for the one GPU resource), the other ingests
# the next pairs and summarises and writes the previous ones meanwhile (equiqc.workflows.tasks).
GPU_WORKER_THREADS = 2
# Environment of the worker processes that local and cuda clusters start, on top of distributed's own
# (``distributed.nanny.pre-spawn-environ``). distributed sets MALLOC_TRIM_THRESHOLD_=65536 to hand memory back to
# the system; setting it also freezes glibc's mmap threshold at 128 KiB, so every array of a 32^3 volume or more
# is mmapped and its pages faulted in and zeroed again on every allocation. A pair's estimate, summaries and
# writes allocate hundreds of such arrays: 25-48 % more time per pair than without the setting (paired runs in one
# process, 199 32^3 pairs, ingest + estimate tasks: 123 -> 182, 147 -> 209, 158 -> 197 ms). Keeping mid-size arrays
# on the heap (mmap only from 32 MiB) brings it back within 5 % (147 -> 154, 158 -> 163 ms) while trimming stays on.
WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": "33554432"}
# Dask configuration of those workers: no statistical profiler (a stack sample of the task thread every 10 ms: 10 to
# 15 % of a worker's time on 32^3 pairs, measured; the dashboard's profile page stays empty, everything else works).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False,
                 **{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}}
# The same for SLURM/PBS workers, which start from a job script: lines appended to its prologue (after the site's
# own, from cluster_options or jobqueue.yaml); the worker processes inherit the job's environment.
JOB_PROLOGUE = [*(f"export {k}={v}" for k, v in WORKER_ENVIRON.items()),
                "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"]


@dataclass
class ClusterHandle:
    client: object  # distributed.Client
    cluster: object | None  # None for an existing scheduler
    gpu: bool

    @property
    def dashboard(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def uses_gpu(config: RunConfig) -> bool:
    """Whether estimation tasks ask for the ``GPU`` resource on this configuration's cluster."""
    return config.cluster == "cuda" or bool(config.gpus_per_worker)


def _jobqueue_default(kind: str, key: str):
    """The site's ``jobqueue.<kind>.<key>`` (jobqueue.yaml, or dask-jobqueue's own default), None if unset."""
    import dask

    try:
        import dask_jobqueue  # noqa: F401  (its import registers the jobqueue defaults with dask's configuration)
    except ImportError:
        pass
    return dask.config.get(f"jobqueue.{kind}.{key}", None)


def cuda_device_count() -> int:
    """CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_workers(config: RunConfig) -> int:
    """Workers of ``--cluster local``: one per core, but a single one on a machine with CUDA GPUs, where every local
    worker would load the model onto GPU 0 (``--cluster cuda`` gives one worker per GPU)."""
    gpus = cuda_device_count()
    if not gpus:
        return config.workers or max(1, os.cpu_count() or 1)
    if config.workers and config.workers > 1:
        raise ConfigError(f"--cluster local --workers {config.workers} on a machine with {gpus} CUDA GPU(s): every "
                          "local worker would put the model on GPU 0; use --cluster cuda (one worker per GPU, "
                          "pip install 'equiqc[gpu]') or --workers 1")
    if not config.workers:
        from equiqc.workflows.logs import LOGGER

        LOGGER.warning(f"this machine has {gpus} CUDA GPU(s): --cluster local runs one worker on GPU 0; "
                       "--cluster cuda runs one worker per GPU")
    return 1


def cluster_kwargs(config: RunConfig) -> tuple[str, dict]:
    """The class to build and its keyword arguments (separate so tests can assert them without hardware)."""
    opts = dict(config.cluster_options)
    if config.cluster in ("local", "cuda"):  # one machine: bound to localhost
        kwargs = {"host": opts.pop("host", "127.0.0.1"),
                  "dashboard_address": opts.pop("dashboard_address", config.dashboard_address),
                  "threads_per_worker": 1}
        if config.cluster == "local":
            return "local", {**kwargs, "n_workers": _local_workers(config), "processes": True, **opts}
        kwargs = {**kwargs, "threads_per_worker": GPU_WORKER_THREADS, "resources": dict(GPU_RESOURCE), **opts}
        if config.workers:
            kwargs.setdefault("n_workers", config.workers)
        return "cuda", kwargs
    kwargs = opts  # only what the user set, and the workers' environment: jobqueue.yaml supplies the rest
    prologue = list(kwargs.get("job_script_prologue") or _jobqueue_default(config.cluster, "job-script-prologue") or [])
    kwargs["job_script_prologue"] = [*prologue, *(line for line in JOB_PROLOGUE if line not in prologue)]
    if config.gpus_per_worker:
        kind = config.cluster
        cores = kwargs.get("cores") or _jobqueue_default(kind, "cores") or 1
        processes = kwargs.get("processes") or _jobqueue_default(kind, "processes") or 1
        if processes != 1:
            raise ConfigError(f"cluster_options processes={processes} with gpus_per_worker: each GPU job runs one "
                              "worker (one GPU, two threads); leave processes at 1 and scale the number of jobs "
                              "with --workers")
        kwargs = {**kwargs, "cores": GPU_WORKER_THREADS, "processes": 1}  # threads of the worker, not CPUs booked
        extra = list(kwargs.get("worker_extra_args") or _jobqueue_default(kind, "worker-extra-args") or [])
        kwargs["worker_extra_args"] = [*extra, "--resources", "GPU=1"]
        if kind == "slurm":
            kwargs.setdefault("job_cpu", cores)
            directives = list(kwargs.get("job_extra_directives")
                              or _jobqueue_default(kind, "job-extra-directives") or [])
            if not any("gres" in d or "gpus" in d for d in directives):
                directives.append(f"--gres=gpu:{config.gpus_per_worker}")
            kwargs["job_extra_directives"] = directives
        else:
            spec = kwargs.get("resource_spec") or _jobqueue_default(kind, "resource-spec")
            if not spec:
                spec = f"select=1:ncpus={cores}"
                memory = kwargs.get("memory") or _jobqueue_default(kind, "memory")
                if memory:
                    from dask.utils import parse_bytes
                    from dask_jobqueue.pbs import pbs_format_bytes_ceil

                    spec += f":mem={pbs_format_bytes_ceil(parse_bytes(memory))}"
            if "ngpus" not in spec:
                spec += f":ngpus={config.gpus_per_worker}"
            kwargs["resource_spec"] = spec
    return config.cluster, kwargs


def _jobqueue_class(kind: str):
    dask_jobqueue = require("dask_jobqueue", "cluster", f"--cluster {kind}", error=ConfigError)
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def build_cluster(config: RunConfig):
    """The cluster object for ``config`` (no jobs are submitted; jobqueue clusters start only their scheduler)."""
    import dask
    from distributed import LocalCluster

    kind, kwargs = cluster_kwargs(config)
    if kind == "local":
        with dask.config.set(WORKER_CONFIG):  # read by each Nanny as it is created, and passed on to its worker
            return LocalCluster(**kwargs)
    if kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except Exception as exc:  # not installed (ImportError), or installed on a machine without CUDA
            raise ConfigError(f"--cluster cuda needs dask-cuda on a machine with CUDA GPUs ({type(exc).__name__}: "
                              f"{exc}): pip install 'equiqc[gpu]' there, or use --cluster local") from exc
        with dask.config.set(WORKER_CONFIG):
            return LocalCUDACluster(**kwargs)
    cls = _jobqueue_class(kind)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # e.g. no cores/memory here or in jobqueue.yaml, unknown keyword
        raise ConfigError(f"--cluster {kind}: dask-jobqueue refused the options {sorted(kwargs)} ({exc}); set them "
                          "in cluster_options or in ~/.config/dask/jobqueue.yaml") from exc


def job_script(config: RunConfig) -> str | None:
    """The job script a jobqueue cluster would submit (None for other clusters); starts no job."""
    if config.scheduler or config.cluster not in ("slurm", "pbs"):
        return None
    cluster = build_cluster(config)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def connect(address: str, gpu: bool, timeout_s: float = 30.0):
    """A client of an existing scheduler; ConfigError if it cannot be reached or has no GPU worker for GPU tasks."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout_s)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"--scheduler {address}: cannot reach the Dask scheduler ({type(exc).__name__}: {exc}); "
                          "check the address and that the scheduler runs") from exc
    if gpu:
        try:  # workers may still be connecting to a scheduler that was just started
            client.wait_for_workers(1, timeout=timeout_s)
        except TimeoutError:
            pass
        workers = client.scheduler_info().get("workers", {})
        if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
            client.close()
            raise ConfigError(
                f"--scheduler {address}: the estimation tasks need the GPU resource, but none of its "
                f"{len(workers)} workers advertises it; start one worker per GPU with "
                f"`CUDA_VISIBLE_DEVICES=i dask worker {address} --nthreads {GPU_WORKER_THREADS} --resources GPU=1` "
                f"(or dask-cuda's `dask cuda worker {address} --resources GPU=1`), or drop --cluster cuda / "
                "gpus_per_worker to run on CPU workers")
    return client


def make_cluster(config: RunConfig) -> ClusterHandle:
    """Start (or connect to) the cluster described by ``config``."""
    from distributed import Client

    gpu = uses_gpu(config)
    if config.scheduler:
        return ClusterHandle(connect(config.scheduler, gpu), None, gpu)
    cluster = build_cluster(config)
    if config.cluster in ("slurm", "pbs"):
        cluster.scale(jobs=config.workers or 1)
    return ClusterHandle(Client(cluster), cluster, gpu)
