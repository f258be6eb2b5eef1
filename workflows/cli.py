"""The ``equiqc`` command line: ingest, run, report, export, demo, estimate.

Exit codes: 0 when a run completed (failed pairs are listed in the report), 2 for unusable input or
configuration (bad manifest, bad option, locked output folder), with one message naming what to fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.perturbations import KINDS
from workflows.config import CLUSTERS, METHODS, ConfigError


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file with options (flags given here override it)")
    p.add_argument("--model", help="default | affine-opt | unigradicon | multigradicon | torchscript:PATH | "
                                   "python:package.module:factory | an equiqc.backends entry point")
    p.add_argument("--weights", help="local weights file for the model (nothing is downloaded)")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--perturbation", choices=KINDS, help="default: the model's (rigid for most models)")
    p.add_argument("--samples", type=int, help="K perturbations (or MC-dropout samples) per pair (default 16)")
    p.add_argument("--batch-size", type=int, help="samples per model call (default 4)")
    p.add_argument("--seed", type=int, help="run seed; each pair's generator is seeded by (seed, pair id)")
    p.add_argument("--cluster", choices=CLUSTERS, help="local (default), cuda, slurm or pbs")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:port)")
    p.add_argument("--workers", type=int, help="worker processes (local: default one per core), GPUs or jobs")
    p.add_argument("--max-voxels", type=int, help="refuse volumes larger than this (memory guard)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace results of another configuration in the output folder")


def _config(args: argparse.Namespace):
    from workflows.config import make_config

    return make_config(args.config, model=args.model, weights=args.weights, method=args.method,
                       perturbation=args.perturbation, samples=args.samples, batch_size=args.batch_size,
                       seed=args.seed, cluster=args.cluster, scheduler=args.scheduler, workers=args.workers,
                       max_voxels=args.max_voxels, overwrite=args.overwrite)


def _print_run(summary) -> None:
    complete = len(summary.rows) - len(summary.failed)
    print(f"pairs: {len(summary.rows)} ({complete} complete, {len(summary.failed)} failed, "
          f"{summary.computed} computed this run) in {summary.seconds:.1f} s")
    print(f"flagged: {len(summary.flagged)}")
    for r in sorted(summary.flagged, key=lambda r: -r["risk_score"])[:10]:
        print(f"  {r['pair_id']}: risk {r['risk_score']:.2f}, p95 uncertainty {r['uncertainty_p95_mm']:.2f} mm")
    for r in summary.failed[:10]:
        print(f"  failed {r['pair_id']}: {r.get('error')}")
    print(f"report: {summary.report}")
    if summary.html:
        print(f"report.html: {summary.html}")


def _cmd_run(args: argparse.Namespace) -> int:
    from workflows.run import run_cohort

    summary = run_cohort(args.manifest, args.out, _config(args))
    _print_run(summary)
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from storage.cohort import ingest_pair
    from storage.manifest import read_manifest

    specs = read_manifest(args.manifest)
    failed = 0
    for spec in specs:
        outcome = ingest_pair(spec, args.store, args.max_voxels)
        failed += outcome.status == "failed"
        print(f"{spec.pair_id}: {outcome.status}" + (f" ({outcome.error})" if outcome.error else ""))
    print(f"{len(specs)} pairs, {failed} failed -> {args.store}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from workflows.run import rebuild_report

    summary = rebuild_report(args.dir)
    _print_run(summary)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from storage.export import export_nifti

    out = Path(args.to)
    for name in args.arrays.split(","):
        path = export_nifti(Path(args.dir) / "results.zarr", Path(args.dir) / "cohort.zarr", args.pair, name,
                            out / f"{args.pair}_{name}.nii.gz")
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from workflows.demo import LABEL_NAMES, build_demo_cohort, demo_summary
    from workflows.run import run_cohort

    config = _config(args)
    atlas = "multipropreg" if config.model == "multipropreg" else "mni"
    cohort = build_demo_cohort(args.out, pairs=args.pairs, seed=args.seed or 0, atlas=atlas)
    print(f"demo cohort: {args.pairs} pairs from the {atlas} atlas -> {cohort.manifest}")
    if atlas == "mni":
        config.label_names = config.label_names or dict(LABEL_NAMES)
    summary = run_cohort(cohort.manifest, args.out, config)
    _print_run(summary)
    stats = demo_summary(summary.rows, cohort.truth)
    print(json.dumps(stats, indent=1))
    print(f"injected failures caught: AUROC {stats['auroc_injected']:.2f} "
          f"({stats['flagged_injected']}/{stats['injected']} injected flagged, {stats['flagged_good']} good flagged)")
    if summary.html:
        print(f"open the QC report: {summary.html}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from pipeline.backends.registry import load_backend
    from pipeline.estimator import EstimatorConfig, estimate_uncertainty
    from pipeline.perturbations import PerturbationConfig
    from storage.nifti import load_volume, save_volume
    from workflows.config import make_config

    kind = args.perturbation or make_config(model=args.model).perturbation  # the model's default, else rigid
    source, target = load_volume(args.source), load_volume(args.target)
    config = EstimatorConfig(samples=args.samples, batch_size=args.batch_size,
                             perturbation=PerturbationConfig(kind=kind))
    result = estimate_uncertainty(load_backend(args.model, weights=args.weights), source.data, target.data,
                                  source.affine, target.affine, config, seed=args.seed)
    print(f"mean std_mm: {np.nanmean(result.std_mm):.4f} mm over {int((result.n_valid >= 2).sum())} voxels")
    if args.out:
        save_volume(args.out, result.std_mm, target.affine)
        print(f"std_mm map (target grid, RAS+): {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equiqc", description="Registration QC by transformation equivariance.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) QC on a cohort manifest")
    run.add_argument("manifest", help="CSV/TSV with subject_id, source, target (+ optional columns)")
    run.add_argument("--out", required=True, help="output folder (results.zarr, report.parquet)")
    _run_options(run)
    run.set_defaults(func=_cmd_run)

    ing = sub.add_parser("ingest", help="NIfTI -> Zarr for a manifest (run does this itself)")
    ing.add_argument("manifest")
    ing.add_argument("--store", required=True, help="cohort Zarr store, e.g. DIR/cohort.zarr")
    ing.add_argument("--max-voxels", type=int, default=None)
    ing.set_defaults(func=_cmd_ingest)

    rep = sub.add_parser("report", help="rebuild the report of a run folder from its stored results")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)

    exp = sub.add_parser("export", help="write result arrays as NIfTI on the target's original grid")
    exp.add_argument("dir", help="run folder")
    exp.add_argument("--pair", required=True)
    exp.add_argument("--to", required=True, help="folder for the NIfTI files")
    exp.add_argument("--arrays", default="std_mm", help="comma-separated (std_mm,covariance_mm2,prediction_map...)")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="synthetic MNI152 cohort with injected failures, run end to end")
    demo.add_argument("--out", required=True)
    demo.add_argument("--pairs", type=int, default=20)
    _run_options(demo)
    demo.set_defaults(func=_cmd_demo)

    est = sub.add_parser("estimate", help="uncertainty of one pair, in this process (no cluster)")
    est.add_argument("source", help="source image (.nii/.nii.gz)")
    est.add_argument("target", help="target image (.nii/.nii.gz)")
    est.add_argument("--model", default="default")
    est.add_argument("--weights")
    est.add_argument("--samples", type=int, default=8, help="K perturbations (default 8)")
    est.add_argument("--batch-size", type=int, default=4, help="perturbations per model call (default 4)")
    est.add_argument("--perturbation", choices=KINDS, help="default: the model's (rigid for most models)")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--out", help="write the std_mm map to this NIfTI file")
    est.set_defaults(func=_cmd_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from storage.manifest import ManifestError
    from storage.nifti import VolumeError
    from workflows.run import RunLocked

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ManifestError, ConfigError, RunLocked, VolumeError, FileNotFoundError, ValueError) as exc:
        print(f"equiqc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
