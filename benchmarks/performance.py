"""What the estimator costs over the model, measured in one run. Default model, MNI152-derived pairs (2 mm).

    python benchmarks/performance.py --pairs 8 --samples 16 --out docs/performance

Parts (``--parts``, comma-separated):

* ``overhead``: per pair, in one process with one torch thread (as a local worker runs), repeated and
  interleaved so the machine's drift hits every measurement alike: (a) the network alone, K+1 forwards at its
  best batch size on inputs already on its grid; (b) the adapter alone, K+1 ``register`` calls; (c) the
  pipeline's work for the pair (read, estimate, summaries, write). Ratios c/a and c/b per repetition, median.
* ``production``: ``equiqc run`` on a LocalCluster of one-thread workers, one per core, all busy; the per-pair
  runtimes stored in the result markers over the network-alone time of the same pairs measured on the same
  workers right after (all busy again).
* ``naive``: a researcher's script with equal outputs (std, valid count and the prediction, as NIfTI, per
  pair): sequential, model loaded per pair, one perturbation per forward, all samples kept, ``np.var``;
  against ``equiqc run`` (both cores) on the same pairs.
* ``diffeomorphic``: that family's cost per sample over the network's forward, one thread: the operations a
  dense perturbation adds over an affine one, timed interleaved with the forward (:func:`diffeomorphic_cost`).
* ``memory``, ``mc``: worker peak RSS at K = 8 and 32; equivariance vs MC-dropout at equal K.

Prints JSON lines; writes ``results.json`` (with the hardware it ran on) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from distributed import Client, LocalCluster

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends import base as B
from equiqc.pipeline.backends.default_net import NET_SHAPE
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


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def network_alone(model, sizes: list[int]) -> float:
    """Seconds for forwards of the network itself in calls of ``sizes`` (inputs already on its grid)."""
    x = torch.rand(max(sizes), 1, *NET_SHAPE)
    with torch.inference_mode():
        start = time.perf_counter()
        for b in sizes:
            model.net(x[:b], x[:b])
    return time.perf_counter() - start


def diffeomorphic_cost(model, v, samples: int, repeats: int) -> dict:
    """What a dense perturbation adds per sample over an affine one, against the network's forward (one thread).

    Timed operation by operation, interleaved with the forward so this VM's drift hits all alike (the difference
    of two whole estimates was dominated by it: 0.07-0.47 s per sample in three repeats): the dense path
    integrates ``tau`` on its coarse grid, samples the source at ``tau`` of the network grid, composes back by
    interpolating ``tau`` at the prediction and checks two fields of view; the affine path samples the source at
    ``T`` of the network grid and checks one (its compose is a matrix product folded into the adapter's own).
    Medians over ``repeats * samples`` samples; the estimates' own stage times are reported beside them.
    """
    src = torch.as_tensor(v["source"].data, dtype=torch.float32)[None, None]
    tgt = torch.as_tensor(v["target"].data, dtype=torch.float32)[None, None]
    a_s, a_t = torch.as_tensor(v["source"].affine), torch.as_tensor(v["target"].affine)
    shape = tuple(src.shape[2:])
    dense = sample_perturbations(PerturbationConfig("diffeomorphic"), samples, shape, a_s, seed=1)
    rigid = sample_perturbations(PerturbationConfig("rigid"), samples, shape, a_s, seed=1)
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    with torch.inference_mode():
        pair = B.prepare(model, src, tgt, a_s, a_t)
        phi = model.register(src, tgt, a_s, a_t)  # a real prediction to compose with
        x = model.intensity(T.warp_affine(src, pair.net_to_source, pair.grid))
        for _ in range(repeats):
            for k in range(samples):
                timed("forward", lambda: model.net(x, pair.target_net))
                tau = timed("dense: integrate tau", lambda k=k: dense.dense([k]))
                timed("dense: sample the source at tau",
                      lambda tau=tau: T.warp(src, tau.on_grid(pair.net_to_source, pair.grid)))
                timed("dense: compose back", lambda k=k, tau=tau: dense.compose_back([k], phi, tau))
                timed("dense: fields of view", lambda: (T.inside_grid(phi, shape), T.inside_grid(phi, shape)))
                timed("affine: sample the source at T", lambda k=k: T.warp_affine(
                    src, rigid.matrices[k:k + 1] @ pair.net_to_source, pair.grid))
                timed("affine: field of view", lambda: T.inside_grid(phi, shape))
    med = {name: statistics.median(t) for name, t in times.items()}
    extra = sum(t for n, t in med.items() if n.startswith("dense")) - sum(
        t for n, t in med.items() if n.startswith("affine"))
    out = {"median_s": {n: round(t, 4) for n, t in med.items()}, "extra_s_per_sample": round(extra, 4),
           "ratio": round(extra / med["forward"], 3), "samples_timed": len(times["forward"])}
    for kind in ("diffeomorphic", "rigid"):  # the whole estimate, for reference (drift included)
        r = estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine,
                                 EstimatorConfig(samples=samples, batch_size=1, perturbation=PerturbationConfig(kind),
                                                 covariance=False), seed=1)
        out[f"estimate_{kind}_s_per_sample"] = {n: round(t / (samples + 1), 4) for n, t in r.timings_s.items()}
    return out


def best_batch(model) -> tuple[int, dict]:
    """The network's fastest batch size per sample on this device (of 1, 2, 4), and the seconds per sample."""
    per_sample = {}
    network_alone(model, [1])  # warm-up
    for b in (1, 2, 4):
        per_sample[b] = min(network_alone(model, [b]) for _ in range(2)) / b
    return min(per_sample, key=per_sample.get), per_sample


def calls(n: int, b: int) -> list[int]:
    return [min(b, n - i) for i in range(0, n, b)]


def pipeline_pair(model, store: Path, results: Path, pair_id: str, cfg: EstimatorConfig) -> tuple[float, dict]:
    """What a worker does for one pair (read, estimate, summaries, write): seconds and the estimator's stages."""
    t0 = time.perf_counter()
    v = read_pair(store, pair_id)
    res = estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine,
                               cfg, seed=pair_seed(0, pair_id))
    summary = pair_summary(res, v["source"].affine, v["target_mask"].data > 0, source_shape=v["source"].data.shape,
                           source=v["source"].data, target=v["target"].data)
    R.write_result(results, pair_id, res, v["target"].affine, {"k": cfg.samples}, None,
                   extra={"summary": {k: x for k, x in summary.items() if np.isfinite(x)}}, overwrite=True)
    total = time.perf_counter() - t0
    return total, {**res.timings_s, "read+summary+write": total - res.timings_s["total"]}


def overhead(specs, store: Path, results: Path, cfg: EstimatorConfig, model, repeats: int) -> dict:
    torch.set_num_threads(1)
    n = cfg.samples + 1
    best, per_sample = best_batch(model)
    ratios_net, ratios_reg, rows = [], [], []
    for spec in specs:
        v = read_pair(store, spec.pair_id)
        src = torch.as_tensor(v["source"].data)[None, None]
        tgt = torch.as_tensor(v["target"].data)[None, None]
        a_s, a_t = torch.as_tensor(v["source"].affine), torch.as_tensor(v["target"].affine)
        for _ in range(repeats):
            net = network_alone(model, calls(n, best))
            t0 = time.perf_counter()
            for _ in range(n):
                model.register(src, tgt, a_s, a_t)
            reg = time.perf_counter() - t0
            total, stages = pipeline_pair(model, store, results, spec.pair_id, cfg)
            ratios_net.append(total / net)
            ratios_reg.append(total / reg)
            rows.append({"pair": spec.pair_id, "network_s": round(net, 2), "register_s": round(reg, 2),
                         "pipeline_s": round(total, 2), **{k: round(x, 3) for k, x in stages.items()}})
    return {"threads": 1, "network_best_batch": best,
            "network_s_per_sample": {b: round(x, 3) for b, x in per_sample.items()},
            "overhead_over_network": round(statistics.median(ratios_net), 3),
            "overhead_over_network_range": [round(min(ratios_net), 3), round(max(ratios_net), 3)],
            "overhead_over_register": round(statistics.median(ratios_reg), 3), "runs": rows}


def _network_task(n: int, b: int) -> float:
    torch.set_num_threads(1)
    return network_alone(load_backend("default"), calls(n, b))


def production(cohort, specs, work: Path, cfg_run: RunConfig, best: int) -> dict:
    workers = os.cpu_count() or 1
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0")
    handle = ClusterHandle(Client(cluster), cluster, False)
    try:
        t0 = time.perf_counter()
        run_cohort(cohort.manifest, work / "production", cfg_run, handle, log=lambda *a: None)
        wall = time.perf_counter() - t0
        markers = [R.read_marker(work / "production" / "results.zarr", s.pair_id) for s in specs]
        n = cfg_run.samples + 1
        futures = [handle.client.submit(_network_task, n, best, pure=False) for _ in specs]
        network = handle.client.gather(futures)
    finally:
        handle.close()
    runtime = sum(m["runtime_s"] for m in markers)
    forward = sum(m["timings_s"]["forward"] for m in markers)
    return {"workers": workers, "threads_per_worker": 1, "pairs": len(specs), "wall_s": round(wall, 1),
            "pairs_per_hour": round(len(specs) / wall * 3600, 1),
            "runtime_s_per_pair": round(runtime / len(specs), 2),
            "backend_calls_s_per_pair": round(forward / len(specs), 2),
            "network_alone_s_per_pair": round(sum(network) / len(specs), 2),
            "overhead_over_network": round(runtime / sum(network), 3),
            "overhead_over_backend_calls": round(runtime / forward, 3)}


def naive(specs, cfg: EstimatorConfig, out: Path) -> tuple[float, dict]:
    """A researcher's script, equal outputs: per pair std, valid count and the prediction as NIfTI."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    maps = {}
    for spec in specs:
        model = load_backend("default")
        src_img, tgt_img = (nib.as_closest_canonical(nib.load(str(p))) for p in (spec.source, spec.target))
        src = torch.as_tensor(np.asarray(src_img.dataobj, np.float32))[None, None]
        tgt = torch.as_tensor(np.asarray(tgt_img.dataobj, np.float32))[None, None]
        a_s, a_t = torch.as_tensor(src_img.affine), torch.as_tensor(tgt_img.affine)
        pert = sample_perturbations(cfg.perturbation, cfg.samples, src.shape[2:], a_s, pair_seed(0, spec.pair_id))
        samples, valid = [], []
        with torch.no_grad():
            prediction = model.register(src, tgt, a_s, a_t)
            for k in range(cfg.samples):
                phi = model.register(T.warp(src, pert.maps([k])), tgt, a_s, a_t)
                psi = pert.compose_back([k], phi)
                valid.append(T.inside_grid(psi, src.shape[2:])[0].numpy())
                samples.append(T.voxel_to_mm(psi.double(), a_s)[0].numpy())
        arr, ok = np.stack(samples), np.stack(valid)
        arr[~np.broadcast_to(ok[:, None], arr.shape)] = np.nan
        with warnings.catch_warnings():  # voxels with fewer than two valid samples are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            std = np.sqrt(np.nanvar(arr, axis=0, ddof=1).sum(0))
        for name, data in (("std", std.astype(np.float32)), ("nvalid", ok.sum(0).astype(np.uint16)),
                           ("prediction", T.map_to_displacement(prediction)[0].permute(1, 2, 3, 0).numpy())):
            nib.save(nib.Nifti1Image(data, tgt_img.affine), str(out / f"{spec.pair_id}_{name}.nii.gz"))
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
cfg = EstimatorConfig(samples=2, perturbation=PerturbationConfig("rigid"))
estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine, cfg)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = EstimatorConfig(samples={k}, perturbation=PerturbationConfig("rigid"))
estimate_uncertainty(model, v["source"].data, v["target"].data, v["source"].affine, v["target"].affine, cfg)
print(json.dumps([base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--overhead-pairs", type=int, default=3, help="pairs of the in-process overhead part")
    p.add_argument("--repeats", type=int, default=2, help="repetitions per pair of the overhead part")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="default: the estimator's choice for the device")
    p.add_argument("--perturbation", default="rigid")
    p.add_argument("--work", default=None, help="scratch folder for the cohorts (default: a new temp folder)")
    p.add_argument("--out", default="docs/performance")
    p.add_argument("--parts", default="overhead,production,naive,memory,diffeomorphic,mc")
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
    pert = PerturbationConfig(args.perturbation)
    cfg = EstimatorConfig(samples=args.samples, batch_size=args.batch_size, perturbation=pert, covariance=False)
    model = load_backend("default")
    res: dict = {"args": vars(args), "hardware": hardware(), "command": " ".join(["python", *sys.argv])}
    print(json.dumps(res), flush=True)
    if "overhead" in parts:
        res["overhead"] = overhead(specs[: args.overhead_pairs], store, work / "inproc" / "results.zarr", cfg, model,
                                   args.repeats)
        print(json.dumps({"overhead": {k: v for k, v in res["overhead"].items() if k != "runs"}}), flush=True)
    run_cfg = RunConfig(samples=args.samples, batch_size=args.batch_size, perturbation=args.perturbation)
    if "production" in parts:
        best = res.get("overhead", {}).get("network_best_batch") or best_batch(model)[0]
        res["production"] = production(cohort, specs, work, run_cfg, best)
        print(json.dumps({"production": res["production"]}), flush=True)
    if "naive" in parts:
        torch.set_num_threads(os.cpu_count() or 1)  # a script uses torch's default: every core
        naive_s, naive_maps = naive(specs, cfg, work / "naive")
        run_dir = work / "naive-pipeline"
        cluster = LocalCluster(n_workers=os.cpu_count(), threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=":0")
        handle = ClusterHandle(Client(cluster), cluster, False)
        try:
            t0 = time.perf_counter()
            run_cohort(cohort.manifest, run_dir, run_cfg, handle, log=lambda *a: None)
            pipeline_s = time.perf_counter() - t0
        finally:
            handle.close()
        diffs = []
        for s in specs:
            std = R.read_array(run_dir / "results.zarr", s.pair_id, "std_mm")[0]
            full = R.read_array(run_dir / "results.zarr", s.pair_id, "n_valid")[0] == args.samples
            rel = np.abs(std - naive_maps[s.pair_id])[full] / np.maximum(naive_maps[s.pair_id][full], 1e-3)
            diffs.append(float(np.median(rel)))
        res["naive"] = {"naive_s": round(naive_s, 1), "pipeline_s": round(pipeline_s, 1),
                        "speedup": round(naive_s / pipeline_s, 2), "naive_torch_threads": torch.get_num_threads(),
                        "median_relative_std_difference": round(max(diffs), 4)}
        print(json.dumps({"naive": res["naive"]}), flush=True)
    if "memory" in parts:
        mem = {}
        for k in (8, 32):
            o = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(store=str(store), pair=specs[0].pair_id,
                                k=k)], capture_output=True, text=True, check=True,
                               env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": "/usr/bin:/bin"})
            mem[k] = json.loads(o.stdout.strip().splitlines()[-1])
        res["memory"] = {f"K{k}": {"peak_rss_MB": round(peak / 1e6, 1)} for k, (_, peak) in mem.items()}
        print(json.dumps({"memory": res["memory"]}), flush=True)
    if "diffeomorphic" in parts:
        torch.set_num_threads(1)
        v = read_pair(store, specs[0].pair_id)
        res["diffeomorphic"] = diffeomorphic_cost(model, v, args.samples, args.repeats)
        print(json.dumps({"diffeomorphic": res["diffeomorphic"]}), flush=True)
    if "mc" in parts:
        torch.set_num_threads(1)
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
    (out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
