"""Peak memory of a worker and of the client against cohort size (default model, K = 4, 1 worker).

    python benchmarks/cohort_memory.py --sizes 4 12

A worker holds one pair at a time and the client only report rows, so neither peak should grow with the
number of pairs. Prints one JSON line per cohort size.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from distributed import Client, LocalCluster

from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import RunConfig
from equiqc.workflows.demo import build_demo_cohort
from equiqc.workflows.run import run_cohort


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 12])
    p.add_argument("--samples", type=int, default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equiqc-mem-"))
    for n in args.sizes:
        cohort = build_demo_cohort(work / f"c{n}", pairs=n, seed=11, failure_fraction=0.0)
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
        handle = ClusterHandle(Client(cluster), cluster, False)  # a fresh worker process per cohort size
        try:
            run_cohort(cohort.manifest, work / f"out{n}", RunConfig(samples=args.samples), handle, log=lambda *a: None)
            worker_peak = list(handle.client.run(_peak_rss_bytes).values())[0]
        finally:
            handle.close()
        print(json.dumps({"pairs": n, "worker_peak_rss_MB": round(worker_peak / 1e6, 1),
                          "client_peak_rss_MB_so_far": round(_peak_rss_bytes() / 1e6, 1)}), flush=True)


if __name__ == "__main__":
    main()
