"""Creating the Dask cluster a run executes on.

* ``local`` (default): ``distributed.LocalCluster`` of processes, one thread each (torch uses that one
  thread), as many workers as cores unless ``--workers``;
* ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker per GPU, each advertising the resource ``GPU=1``
  (estimation tasks ask for it); needs ``pip install equiqc[gpu]`` on a machine with CUDA;
* ``slurm`` / ``pbs``: ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` with ``cluster_options`` from the
  config file (queue, cores, memory, walltime, job_extra_directives...), scaled to ``--workers`` jobs;
  needs ``pip install equiqc[cluster]``;
* ``--scheduler tcp://host:port``: an existing cluster; nothing is created.

The scheduler and dashboard of clusters created here bind to 127.0.0.1 unless the options say otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distributed import Client, LocalCluster

from workflows.config import ConfigError, RunConfig


@dataclass
class ClusterHandle:
    client: Client
    cluster: object | None  # None for an existing scheduler
    gpu: bool

    @property
    def dashboard(self) -> str | None:
        return getattr(self.client, "dashboard_link", None)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def cluster_kwargs(config: RunConfig) -> tuple[str, dict]:
    """The class to build and its keyword arguments (separate so tests can assert them without hardware)."""
    opts = dict(config.cluster_options)
    if config.cluster in ("local", "cuda"):  # one machine: bound to localhost, one thread per worker
        kwargs = {"host": opts.pop("host", "127.0.0.1"),
                  "dashboard_address": opts.pop("dashboard_address", config.dashboard_address),
                  "threads_per_worker": 1}
        if config.cluster == "local":
            workers = config.workers or max(1, os.cpu_count() or 1)
            return "local", {**kwargs, "n_workers": workers, "processes": True, **opts}
        kwargs = {**kwargs, "resources": {"GPU": 1}, **opts}
        if config.workers:
            kwargs.setdefault("n_workers", config.workers)
        return "cuda", kwargs
    kwargs = {"scheduler_options": {"host": "127.0.0.1", "dashboard_address": config.dashboard_address},
              "processes": 1, "cores": 1, "memory": "16GB", **opts}
    return config.cluster, kwargs


def make_cluster(config: RunConfig) -> ClusterHandle:
    """Start (or connect to) the cluster described by ``config``."""
    if config.scheduler:
        return ClusterHandle(Client(config.scheduler), None, config.cluster == "cuda")
    kind, kwargs = cluster_kwargs(config)
    if kind == "local":
        cluster = LocalCluster(**kwargs)
    elif kind == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise ConfigError("--cluster cuda needs dask-cuda on a machine with CUDA GPUs: "
                              "pip install 'equiqc[gpu]'") from exc
        cluster = LocalCUDACluster(**kwargs)
    else:
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise ConfigError(f"--cluster {kind} needs dask-jobqueue: pip install 'equiqc[cluster]'") from exc
        cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
        cluster = cls(**kwargs)
        cluster.scale(jobs=config.workers or 1)
    return ClusterHandle(Client(cluster), cluster, kind == "cuda")
