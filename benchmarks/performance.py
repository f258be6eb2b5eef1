"""What the pipeline costs, measured in one run: breakdown, overhead over the model, scaling, a naive
baseline, memory, and equivariance vs MC-dropout. Default model, MNI152-derived pairs (2 mm).

    python benchmarks/performance.py --pairs 8 --samples 16 --batch-size 4 --out docs/performance

Prints JSON lines; writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from distributed import Client, LocalCluster

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty, mc_dropout_config
from equiqc.pipeline.perturbations import PerturbationConfig, pair_seed, sample_perturbations
from equiqc.pipeline.scores import pair_summary
from equiqc.storage import results as R
from equiqc.storage.cohort import ingest_pair, read_pair
from equiqc.storage.manifest import read_manifest
from equiqc.workflows.cluster import ClusterHandle
from equiqc.workflows.config import RunConfig
from equiqc.workflows.demo import build_demo_cohort
from equiqc.workflows.run import run_cohort


def in_process(specs, store: Path, results: Path, cfg: EstimatorConfig, model) -> dict:
    """Per-pair breakdown of the pipeline's work in one process, and forward-only time for the same calls."""
    stages = {"read": 0.0, "perturb": 0.0, "forward": 0.0, "compose": 0.0, "statistics": 0.0, "summary+write": 0.0}
    total, forward_only = 0.0, 0.0
    n_calls = -(-(cfg.samples + 1) // cfg.batch_size)
    sizes = [min(cfg.batch_size, cfg.samples + 1 - i * cfg.batch_size) for i in range(n_calls)]
    for spec in specs:
        t0 = time.perf_counter()
        v = read_pair(store, spec.pair_id)
        t1 = time.perf_counter()
        res = estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine,
                                   v["target"].affine, cfg, seed=pair_seed(0, spec.pair_id))
        t2 = time.perf_counter()
        summary = pair_summary(res, v["source"].affine, v["target_mask"].data > 0)
        R.write_result(results, spec.pair_id, res, v["target"].affine, {"k": cfg.samples}, None,
                       extra={"summary": {k: v for k, v in summary.items() if np.isfinite(v)}}, overwrite=True)
        t3 = time.perf_counter()
        total += t3 - t0
        stages["read"] += t1 - t0
        stages["summary+write"] += t3 - t2
        for k in ("perturb", "forward", "compose", "statistics"):
            stages[k] += res.timings_s.get(k, 0.0)
        src = torch.as_tensor(v["source"].data)[None, None]
        tgt = torch.as_tensor(v["target"].data)[None, None]
        a_s, a_t = torch.as_tensor(v["source"].affine), torch.as_tensor(v["target"].affine)
        f0 = time.perf_counter()
        for b in sizes:  # the same model calls, nothing else
            model.register(src.expand(b, -1, -1, -1, -1), tgt.expand(b, -1, -1, -1, -1), a_s, a_t)
        forward_only += time.perf_counter() - f0
    n = len(specs)
    return {"per_pair_s": {k: round(x / n, 3) for k, x in stages.items()}, "pipeline_s_per_pair": round(total / n, 3),
            "forward_only_s_per_pair": round(forward_only / n, 3), "overhead_ratio": round(total / forward_only, 3)}


def naive(specs, cfg: EstimatorConfig, out: Path) -> tuple[float, dict]:
    """How a researcher would script it: sequential, model loaded per pair, one perturbation per forward,
    NIfTI in and out, all samples kept in memory then np.std."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    maps = {}
    for spec in specs:
        model = load_backend("default")
        src_img, tgt_img = nib.as_closest_canonical(nib.load(str(spec.source))), nib.as_closest_canonical(
            nib.load(str(spec.target)))
        src = torch.as_tensor(np.asarray(src_img.dataobj, np.float32))[None, None]
        tgt = torch.as_tensor(np.asarray(tgt_img.dataobj, np.float32))[None, None]
        a_s, a_t = torch.as_tensor(src_img.affine), torch.as_tensor(tgt_img.affine)
        pert = sample_perturbations(cfg.perturbation, cfg.samples, src.shape[2:], a_s, pair_seed(0, spec.pair_id))
        samples = []
        with torch.no_grad():
            for k in range(cfg.samples):
                tau = pert.maps([k])
                phi = model.register(T.warp(src, tau), tgt, a_s, a_t)
                psi = pert.compose_back([k], phi)
                samples.append(T.voxel_to_mm(psi.double(), a_s)[0].numpy())
        arr = np.stack(samples)
        std = np.sqrt(arr.var(axis=0, ddof=1).sum(0))
        nib.save(nib.Nifti1Image(std.astype(np.float32), tgt_img.affine), str(out / f"{spec.pair_id}_std.nii.gz"))
        maps[spec.pair_id] = std
    return time.perf_counter() - start, maps


MEMORY_PROBE = """
import json, resource, numpy as np, torch
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
from equiqc.pipeline.perturbations import PerturbationConfig
from equiqc.storage.cohort import read_pair
torch.set_num_threads(1)
v = read_pair({store!r}, {pair!r})
model = load_backend("default")
cfg = EstimatorConfig(samples=2, batch_size={b}, perturbation=PerturbationConfig("rigid"))
estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine, cfg)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = EstimatorConfig(samples={k}, batch_size={b}, perturbation=PerturbationConfig("rigid"))
estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine, cfg)
print(json.dumps([base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", default=None, help="scratch folder for the cohorts (default: a new temp folder)")
    p.add_argument("--out", default="docs/performance")
    p.add_argument("--parts", default="in_process,scaling,naive,memory,mc",
                   help="comma-separated subset of in_process,scaling,naive,memory,mc")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="equiqc-perf-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = build_demo_cohort(work, pairs=args.pairs, seed=5, failure_fraction=0.0)
    specs = read_manifest(cohort.manifest)
    store = work / "inproc" / "cohort.zarr"
    for s in specs:
        ingest_pair(s, store)
    cfg = EstimatorConfig(samples=args.samples, batch_size=args.batch_size, perturbation=PerturbationConfig("rigid"))
    model = load_backend("default")
    res: dict = {"args": vars(args), "threads": torch.get_num_threads()}
    if "in_process" in parts:
        res["in_process"] = in_process(specs, store, work / "inproc" / "results.zarr", cfg, model)
        print(json.dumps({"in_process": res["in_process"]}), flush=True)
    if parts & {"scaling", "naive", "memory", "mc"}:
        _rest(args, parts, res, cohort, specs, store, cfg, model, work)
    (out / "results.json").write_text(json.dumps(res, indent=1))


def _rest(args, parts, res, cohort, specs, store, cfg, model, work) -> None:

    rates = {}
    for workers in (1, 2):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
        handle = ClusterHandle(Client(cluster), cluster, False)
        try:
            t0 = time.perf_counter()
            run_cohort(cohort.manifest, work / f"cluster{workers}", RunConfig(samples=args.samples,
                       batch_size=args.batch_size), handle, log=lambda *a: None)
            rates[workers] = args.pairs / ((time.perf_counter() - t0) / 60)
        finally:
            handle.close()
    res["scaling"] = {"pairs_per_min_1_worker": round(rates[1], 2), "pairs_per_min_2_workers": round(rates[2], 2),
                      "efficiency": round(rates[2] / (2 * rates[1]), 3)}
    print(json.dumps({"scaling": res["scaling"]}), flush=True)

    naive_s, naive_maps = naive(specs, cfg, work / "naive")
    diffs = []
    for s in specs:  # compare where every sample stayed in the field of view (the naive script does not mask)
        std = R.read_array(work / "cluster2" / "results.zarr", s.pair_id, "std_mm")[0]
        full = R.read_array(work / "cluster2" / "results.zarr", s.pair_id, "n_valid")[0] == args.samples
        diffs.append(float(np.abs(std - naive_maps[s.pair_id])[full].max()))
    res["naive"] = {"naive_s": round(naive_s, 1), "pipeline_2_workers_s": round(args.pairs / rates[2] * 60, 1),
                    "speedup": round(naive_s / (args.pairs / rates[2] * 60), 2),
                    "max_abs_std_difference_mm": round(max(diffs), 6)}
    print(json.dumps({"naive": res["naive"]}), flush=True)

    mem = {}
    for k in (8, 32):
        o = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(store=str(store),
                            pair=specs[0].pair_id, k=k, b=args.batch_size)], capture_output=True, text=True,
                           check=True, env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin"})
        base, peak = json.loads(o.stdout.strip().splitlines()[-1])
        mem[k] = (base, peak)
    volume = int(np.prod(read_pair(store, specs[0].pair_id, ("target",))["target"].data.shape)) * 4
    res["memory"] = {"volume_MB": round(volume / 1e6, 2),
                     **{f"K{k}": {"peak_rss_MB": round(p / 1e6, 1), "peak_over_model_loaded_volumes":
                                  round((p - b) / volume, 1)} for k, (b, p) in mem.items()}}
    print(json.dumps({"memory": res["memory"]}), flush=True)

    v = read_pair(store, specs[0].pair_id)
    mc = load_backend("default", mc_dropout=True)
    args_e = (v["source"].data, v["target"].data, v["source"].affine, v["target"].affine)
    t0 = time.perf_counter()
    estimate_uncertainty(model, *args_e, cfg)
    t1 = time.perf_counter()
    estimate_uncertainty(mc, *args_e, mc_dropout_config(args.samples, args.batch_size))
    t2 = time.perf_counter()
    res["equivariance_vs_mc_dropout"] = {"equivariance_s": round(t1 - t0, 2), "mc_dropout_s": round(t2 - t1, 2),
                                         "ratio": round((t1 - t0) / (t2 - t1), 3)}
    print(json.dumps({"equivariance_vs_mc_dropout": res["equivariance_vs_mc_dropout"]}), flush=True)
    res["max_rss_this_process_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)


if __name__ == "__main__":
    main()
