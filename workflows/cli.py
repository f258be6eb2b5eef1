"""The ``equiqc`` command line: ingest, run, report, export, demo, calibrate, bids, fmriprep, estimate,
options.

Exit codes: 0 when a run completed with at least one complete pair (failed pairs are listed in the
report); 2 for unusable input or configuration (bad manifest, bad option, unknown model, missing weights,
locked output folder), with one line naming what to fix (``--debug`` adds the traceback); 3 when no pair
completed. Any other error is a bug and keeps its traceback (exit 1).

Building the parser imports neither torch nor Dask, so ``equiqc --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import equiqc
from equiqc.errors import UserError
from equiqc.workflows.config import ESTIMATE, RUN, cli_options, flag_name

NO_PAIR_COMPLETED = 3


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or TOML file with options (flags given here override it)")
    _config_flags(p, RUN)
    _model_declarations(p)


def _config_flags(p: argparse.ArgumentParser, group: str) -> None:
    """A flag for every option of ``group`` (workflows/config.py declares them: name, type, default, choices, help);
    no flag has a default of its own (None: the config file's value, else the option's default)."""
    for name, base, default, meta in cli_options(group):
        shown = (f"default: {meta['default_text']}" if "default_text" in meta
                 else f"default {default}" if default is not None and default is not False else None)
        kwargs: dict = {"default": None, "help": meta["help"] + (f" ({shown})" if shown else "")}
        if base is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = base
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        p.add_argument(flag_name(name), **kwargs)


def _model_declarations(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-convention", metavar="KIND/UNITS/AXES",
                   help="torchscript:/python: models: what the network outputs, e.g. displacement/voxel/ij or "
                        "map/normalized/xy (see equiqc.pipeline.backends.conventions); default displacement/voxel/ij")
    p.add_argument("--input-shape", nargs="+", type=int, metavar="N",
                   help="torchscript:/python: models: the fixed grid the network consumes, in its own axis order, "
                        "e.g. 160 192 224")
    p.add_argument("--input-layout", metavar="CODE",
                   help="torchscript:/python: models: the anatomical direction of each array axis the network "
                        "expects, e.g. RAS (default: equiqc's RAS+ arrays), LIA (FreeSurfer), SAR (ITK arrays of "
                        "RAS-stored files)")
    p.add_argument("--ants-preset", metavar="NAME", help="--model ants: SyN (default), any antspyx "
                   "type_of_transform (SyNRA, antsRegistrationSyNQuick[s], Affine...), fmriprep or fmriprep-sloppy "
                   "(fMRIPrep's T1w-to-template settings)")
    p.add_argument("--ants-parameters", metavar="FILE", help="--model ants: a JSON/YAML parameter set in nipype "
                   "Registration keys (e.g. a niworkflows settings file) instead of a preset")
    p.add_argument("--ants-seed", metavar="N|none", help="--model ants: ANTs' random seed (default 1: "
                   "bit-reproducible); none: unseeded (use --draws 2+ to measure ANTs' run-to-run scatter)")
    p.add_argument("--ants-threads", type=int, metavar="N", help="--model ants: ITK threads per registration "
                   "(default 1: reproducible; one worker per core does the rest)")


def _model_options(args: argparse.Namespace) -> dict:
    """``model_options`` declared by flags (merged over the config file's)."""
    options = {}
    if getattr(args, "output_convention", None):
        options["convention"] = args.output_convention
    if getattr(args, "input_shape", None):
        options["input_shape"] = list(args.input_shape)
    if getattr(args, "input_layout", None):
        options["layout"] = args.input_layout
    if getattr(args, "ants_preset", None):
        options["preset"] = args.ants_preset
    if getattr(args, "ants_parameters", None):
        options["parameters"] = str(Path(args.ants_parameters).resolve())
    if getattr(args, "ants_seed", None) is not None:
        unseeded = args.ants_seed.lower() in ("none", "null")
        options["seed"] = None if unseeded else _integer("--ants-seed", args.ants_seed)
    if getattr(args, "ants_threads", None) is not None:
        options["threads"] = args.ants_threads
    return options


def _integer(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not an integer (or none)") from None


def _flag_options(args: argparse.Namespace) -> dict:
    """The config options given as flags (None where not given: the config file's value or the default applies)."""
    return {name: getattr(args, name, None) for name, *_ in cli_options(RUN) + cli_options(ESTIMATE)}


def _config(args: argparse.Namespace):
    from equiqc.workflows.config import make_config

    return make_config(args.config, model_options=_model_options(args), **_flag_options(args))


def _print_run(summary) -> None:
    complete = len(summary.rows) - len(summary.failed)
    print(f"pairs: {len(summary.rows)} ({complete} complete, {len(summary.failed)} failed, "
          f"{summary.computed} computed this run) in {summary.seconds:.1f} s")
    if not summary.partial:
        print(f"flagged: {len(summary.flagged)}")
    for r in sorted(summary.flagged, key=lambda r: -r["risk_score"])[:10]:
        print(f"  {r['pair_id']}: {','.join(r['flag_reasons'])}; risk {r['risk_score']:.2f}, "
              f"mean / p95 uncertainty {r['uncertainty_mean_mm']:.2f} / {r['uncertainty_p95_mm']:.2f} mm")
    for r in summary.failed[:10]:
        print(f"  failed {r['pair_id']}: {r.get('error')}")
    if summary.partial and not summary.shard:
        print("participant level done; once every participant has run: equiqc bids BIDS_DIR OUT group")
    elif summary.shard:
        print(f"shard {summary.shard[0]}/{summary.shard[1]} done; once every shard has run: equiqc report OUT "
              "(merges them into one report)")
    else:
        print(f"report: {summary.report}; decisions: {summary.report.with_name('decisions.tsv')} "
              f"(to drop: {summary.report.with_name('exclude.tsv')})")
    if summary.html:
        print(f"report.html: {summary.html}")


def _exit_code(summary) -> int:
    """0 when at least one pair is complete, else :data:`NO_PAIR_COMPLETED` (said on stderr)."""
    if not summary.rows or len(summary.rows) > len(summary.failed):  # an empty shard is not a failure
        return 0
    print(f"equiqc: no pair completed ({len(summary.failed)} failed); see the errors above",
          file=sys.stderr)
    return NO_PAIR_COMPLETED


def _cmd_run(args: argparse.Namespace) -> int:
    from equiqc.workflows.run import parse_shard, plan_run, run_cohort

    shard = parse_shard(args.shard)
    if args.dry_run:
        print(plan_run(args.manifest, args.out, _config(args), shard))
        return 0
    summary = run_cohort(args.manifest, args.out, _config(args), argv=sys.argv, shard=shard)
    _print_run(summary)
    return _exit_code(summary)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from equiqc.storage.cohort import ingest_pair
    from equiqc.storage.manifest import read_manifest

    specs = read_manifest(args.manifest)
    failed = 0
    for spec in specs:
        outcome = ingest_pair(spec, args.store, args.max_voxels)
        failed += outcome.status == "failed"
        print(f"{spec.pair_id}: {outcome.status}" + (f" ({outcome.error})" if outcome.error else ""))
    print(f"{len(specs)} pairs, {failed} failed -> {args.store}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from equiqc.workflows.run import rebuild_report

    summary = rebuild_report(args.dir, tolerance_mm=args.tolerance_mm, ratings=args.ratings)
    _print_run(summary)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from equiqc.storage.export import MAPS, export_array
    from equiqc.storage.results import complete_pairs
    from equiqc.storage.run_folder import cohort_store, results_store

    results, out = results_store(args.dir), Path(args.to)
    pairs = complete_pairs(results) if args.all else args.pair
    if args.layout == "bids":
        from equiqc.workflows.bids import export_derivatives

        for path in export_derivatives(args.dir, out, pairs):
            print(path)
        return 0
    for pair in pairs:
        for name in args.arrays.split(","):
            file = f"{pair}_{name}_xfm.{args.transform_format}" if name in MAPS else f"{pair}_{name}.nii.gz"
            print(export_array(results, cohort_store(args.dir), pair, name, out / file))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from equiqc.pipeline.backends.registry import model_atlas
    from equiqc.workflows.demo import LABEL_NAMES, build_demo_cohort, demo_summary
    from equiqc.workflows.run import run_cohort

    config = _config(args)
    atlas = model_atlas(config.model)
    cohort = build_demo_cohort(args.out, pairs=args.pairs, seed=args.seed or 0, atlas=atlas)
    print(f"demo cohort: {args.pairs} pairs from the {atlas} atlas -> {cohort.manifest}")
    if atlas == "mni":
        config.label_names = config.label_names or dict(LABEL_NAMES)
    summary = run_cohort(cohort.manifest, args.out, config, argv=sys.argv)
    _print_run(summary)
    stats = demo_summary(summary.rows, cohort.truth)
    print(json.dumps(stats, indent=1))
    print(f"injected failures caught: AUROC {stats['auroc_injected']:.2f} "
          f"({stats['flagged_injected']}/{stats['injected']} injected flagged, {stats['flagged_good']} good flagged)")
    if summary.html:
        print(f"open the QC report: {summary.html}")
    return _exit_code(summary)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from equiqc.workflows.calibrate import calibrate

    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_name(f"{out.stem}-cohort")
    record = calibrate(_config(args), out, work, pairs_per_family=args.pairs_per_family, families=args.families,
                       template=args.template, template_mask=args.template_mask, coverage=args.coverage,
                       strength=tuple(args.strength), argv=sys.argv)
    cal = record["calibration"]
    print(f"calibration: {out} ({cal['n']} pairs of {len(record['cohort']['families'])} families; log error = "
          f"{cal['intercept']:.3g} + " + " + ".join(f"{w:.3g} {f}" for f, w in zip(cal["features"], cal["weights"],
                                                                                   strict=True) if w > 0)
          + f"; conformal offset {cal['offset']:.3f})")
    print(f"{cal['coverage']:.0%} upper bound, coverage with each family left out of the fit:")
    for family, v in record["leave_one_family_out"].items():
        print(f"  {family}: {v['covered']}/{v['n']} (95 % interval {v['coverage_ci95'][0]:.2f}-"
              f"{v['coverage_ci95'][1]:.2f}; in range {v['in_range']}/{v['n']}; mean |expected - true| "
              f"{v['mean_abs_error_of_expected_mm']:.2f} mm)")
    table = record["voxel_leave_one_family_out"]
    if table:
        print("error_mm per voxel, each family left out (median voxel Spearman with the true error):")
        for family in dict.fromkeys(line["family"] for line in table):
            rho = {line["predictor"]: line["spearman_median"] for line in table if line["family"] == family}
            print(f"  {family}: " + ", ".join(f"{name} {value:.2f}" for name, value in rho.items()))
    print(f"cohort and its report: {work}")
    return 0


def _cmd_bids(args: argparse.Namespace) -> int:
    from equiqc.workflows.bids import group_level, participant_level

    if args.level == "group":
        summary = group_level(args.out, tolerance_mm=args.tolerance_mm, ratings=args.ratings)
    else:
        if not args.target:
            print("equiqc: the participant level needs --target TEMPLATE.nii.gz (the image every pair registers to)",
                  file=sys.stderr)
            return 2
        from equiqc.workflows.run import parse_shard

        summary = participant_level(args.bids_dir, args.out, _config(args), args.target, args.target_mask,
                                    args.target_labels, args.participant_label, args.session_label, args.suffix,
                                    args.target_space, argv=sys.argv, shard=parse_shard(args.shard))
    _print_run(summary)
    return _exit_code(summary)


def _cmd_fmriprep(args: argparse.Namespace) -> int:
    from equiqc.workflows.fmriprep import fmriprep_config_overrides, group_level, participant_level
    from equiqc.workflows.run import parse_shard

    if args.level == "group":
        summary = group_level(args.out, tolerance_mm=args.tolerance_mm, ratings=args.ratings)
    else:
        from equiqc.workflows.config import make_config

        replay = fmriprep_config_overrides(args.sloppy, args.model, _model_options(args))  # model, model_options
        config = make_config(args.config, **{**_flag_options(args), **replay})
        summary = participant_level(args.fmriprep_dir, args.out, config, args.space, args.target, args.target_mask,
                                    args.participant_label, argv=sys.argv, shard=parse_shard(args.shard))
    _print_run(summary)
    return _exit_code(summary)


def _cmd_estimate(args: argparse.Namespace) -> int:
    import numpy as np

    from equiqc.pipeline.backends.registry import load_backend
    from equiqc.pipeline.estimator import estimate_uncertainty
    from equiqc.storage.nifti import load_volume, save_on_original_grid
    from equiqc.workflows.config import make_config
    from equiqc.workflows.provenance import probe_model

    config = make_config(model_options=_model_options(args), **_flag_options(args))  # the run's defaults
    probe_model(config)  # one clear error for an unknown model or missing weights
    source, target = load_volume(args.source), load_volume(args.target)
    backend = load_backend(config.model, weights=config.weights, **config.model_options)
    result = estimate_uncertainty(backend, source.data, target.data, source.affine, target.affine,
                                  config.estimator_config(), seed=config.seed)
    print(f"mean std_mm: {np.nanmean(result.std_mm):.4f} mm over {int(np.isfinite(result.std_mm).sum())} voxels")
    if args.out:
        save_on_original_grid(args.out, result.std_mm, target)
        print(f"std_mm map (mm, on the target file's own grid and header): {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equiqc", description="Registration QC by transformation equivariance.")
    parser.add_argument("--version", action="version", version=f"equiqc {equiqc.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="log every pair (DEBUG) on stderr")
    noise.add_argument("-q", "--quiet", action="store_true", help="warnings only on stderr; no progress bar")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) QC on a cohort manifest")
    run.add_argument("manifest", help="CSV/TSV with subject_id, source, target (+ optional columns)")
    run.add_argument("--out", required=True, help="output folder (results.zarr, report.parquet)")
    run.add_argument("--shard", metavar="I/N", help="compute the I-th of N deterministic slices of the manifest "
                     "(job arrays); shards share --out and run side by side; `equiqc report OUT` merges them")
    run.add_argument("--dry-run", action="store_true", help="print the plan (pairs to compute, the cluster, a "
                     "jobqueue job script) and start nothing")
    _run_options(run)
    run.set_defaults(func=_cmd_run)

    ing = sub.add_parser("ingest", help="NIfTI -> Zarr for a manifest (run does this itself)")
    ing.add_argument("manifest")
    ing.add_argument("--store", required=True, help="cohort Zarr store, e.g. DIR/cohort.zarr")
    ing.add_argument("--max-voxels", type=int, default=None)
    ing.set_defaults(func=_cmd_ingest)

    rep = sub.add_parser("report", help="rebuild the report of a run folder from its stored results")
    rep.add_argument("dir")
    rep.add_argument("--tolerance-mm", type=float, help="re-threshold the decision: the registration error (mm) a "
                     "pair may have (kept for later reports); nothing is recomputed")
    rep.add_argument("--ratings", help="a TSV of people's ratings (pair_id, rating = include/exclude/unsure, rater, "
                     "note), merged into DIR/ratings.tsv; a rating decides over the flags and stays")
    rep.set_defaults(func=_cmd_report)

    exp = sub.add_parser("export", help="write result arrays as NIfTI on the target's original grid and header; "
                         "maps as displacement fields ANTs, ITK and Slicer apply")
    exp.add_argument("dir", help="run folder")
    which = exp.add_mutually_exclusive_group(required=True)
    which.add_argument("--pair", action="append", help="a pair id (repeat the option for several)")
    which.add_argument("--all", action="store_true", help="every pair with a complete result")
    exp.add_argument("--to", required=True, help="folder for the files")
    exp.add_argument("--arrays", default="std_mm", help="comma-separated (std_mm,error_mm,n_valid,covariance_mm2,"
                     "prediction_map,mean_map); maps become ITK displacement fields (LPS mm, target grid)")
    exp.add_argument("--layout", choices=("flat", "bids"), default="flat", help="flat: <pair>_<array> files; bids: "
                     "BIDS derivatives (std_mm, error_mm when stored, and the prediction with sidecars, entities "
                     "from the source file names)")
    exp.add_argument("--transform-format", choices=("nii.gz", "h5"), default="nii.gz",
                     help="maps: 5D NIfTI (antsApplyTransforms) or an ITK .h5 transform (Slicer, ITK)")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="synthetic MNI152 cohort with injected failures, run end to end")
    demo.add_argument("--out", required=True)
    demo.add_argument("--pairs", type=int, default=20)
    _run_options(demo)
    demo.set_defaults(func=_cmd_demo)

    cal = sub.add_parser("calibrate", help="fit a model's expected error (mm) mapping on synthetic cohorts with known "
                         "maps from several generator families (for equiqc run --calibration)")
    cal.add_argument("--out", required=True, help="the calibration file to write (JSON)")
    cal.add_argument("--work", help="folder for the calibration cohort and its run (default: OUT's name + -cohort)")
    cal.add_argument("--template", help="template NIfTI the cohort is built from (default: the model's own atlas "
                     "for multipropreg, MNI152 2009 at 2 mm otherwise)")
    cal.add_argument("--template-mask", help="the template's evaluation region (default: voxels above 5 %% of its "
                     "maximum)")
    cal.add_argument("--pairs-per-family", type=int, default=14, help="pairs of each generator family (default 14)")
    cal.add_argument("--families", nargs="+", metavar="FAMILY", help="generator families of known maps (default: "
                     "all of affine_velocity affine bspline local; at least three)")
    cal.add_argument("--coverage", type=float, default=0.9, help="stated coverage of the upper bound (default 0.9)")
    cal.add_argument("--strength", type=float, nargs=2, default=(0.25, 2.5), metavar=("LO", "HI"),
                     help="each pair's map ranges are its family's times a factor in [LO, HI] (default 0.25 2.5)")
    _run_options(cal)
    cal.set_defaults(func=_cmd_calibrate)

    bids = sub.add_parser("bids", help="BIDS App: participant level computes the participants' pairs and writes "
                          "BIDS derivatives; group level writes the cohort decision and report")
    bids.add_argument("bids_dir", help="the BIDS dataset's root folder")
    bids.add_argument("out", help="the derivatives folder (also an equiqc run folder)")
    bids.add_argument("level", choices=("participant", "group"))
    bids.add_argument("--participant-label", nargs="+", help="participants to compute (default: all), with or "
                      "without 'sub-'")
    bids.add_argument("--session-label", nargs="+", help="only these sessions (with or without 'ses-')")
    bids.add_argument("--suffix", default="T1w", help="the anat images to register (default T1w)")
    bids.add_argument("--target", help="participant level: the template every image registers to (NIfTI)")
    bids.add_argument("--target-mask", help="the template's evaluation region (NIfTI mask)")
    bids.add_argument("--target-labels", help="the template's structure labels (NIfTI)")
    bids.add_argument("--target-space", help="its BIDS space label (default: the tpl- entity or file name)")
    bids.add_argument("--ratings", help="group level: a ratings TSV merged into OUT/ratings.tsv (see equiqc report)")
    bids.add_argument("--shard", metavar="I/N", help="participant level: compute the I-th of N slices of the "
                      "dataset's pairs (job arrays; instead of --participant-label)")
    _run_options(bids)
    bids.set_defaults(func=_cmd_bids)

    fmp = sub.add_parser("fmriprep", help="BIDS App: QC of fMRIPrep/sMRIPrep's T1w-to-template normalisations (their "
                         "xfm.h5 checked against perturbed replays of their ANTs registration); participant, then "
                         "group level")
    fmp.add_argument("fmriprep_dir", help="fMRIPrep's (or sMRIPrep's) output folder: its sub-<label> "
                     "folders and dataset_description.json")
    fmp.add_argument("out", help="the derivatives folder (also an equiqc run folder)")
    fmp.add_argument("level", choices=("participant", "group"))
    fmp.add_argument("--space", default="MNI152NLin2009cAsym", help="the template space whose normalisation is "
                     "checked: the <space> of from-T1w_to-<space>_mode-image_xfm.h5 (default MNI152NLin2009cAsym)")
    fmp.add_argument("--target", help="the template's T1w image (default: tpl-<space>_res-02_T1w.nii.gz, else "
                     "res-01, in a local TemplateFlow folder, $TEMPLATEFLOW_HOME or ~/.cache/templateflow; never "
                     "downloaded)")
    fmp.add_argument("--target-mask", help="the template's brain mask, the evaluation region (default: TemplateFlow's "
                     "desc-brain_mask beside the default target)")
    fmp.add_argument("--participant-label", nargs="+", help="participants to compute (default: all), with or "
                     "without 'sub-'")
    fmp.add_argument("--sloppy", action="store_true", help="replay fMRIPrep's --sloppy registration (preset "
                     "fmriprep-sloppy) instead of its default one (fmriprep)")
    fmp.add_argument("--ratings", help="group level: a ratings TSV merged into OUT/ratings.tsv (see equiqc report)")
    fmp.add_argument("--shard", metavar="I/N", help="participant level: compute the I-th of N slices of the "
                     "subjects (job arrays; instead of --participant-label)")
    _run_options(fmp)
    fmp.set_defaults(func=_cmd_fmriprep)

    est = sub.add_parser("estimate", help="uncertainty of one pair, in this process (no cluster)")
    est.add_argument("source", help="source image (.nii/.nii.gz)")
    est.add_argument("target", help="target image (.nii/.nii.gz)")
    _config_flags(est, ESTIMATE)
    est.add_argument("--out", help="write the std_mm map to this NIfTI file")
    _model_declarations(est)
    est.set_defaults(func=_cmd_estimate)

    opts = sub.add_parser("options", help="list every config-file option with its type, default and meaning")
    opts.set_defaults(func=_cmd_options)
    return parser


def _cmd_options(args: argparse.Namespace) -> int:
    from equiqc.workflows.config import options_help

    print(options_help())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from equiqc.workflows.logs import configure_console

    configure_console(-1 if args.quiet else 1 if args.verbose else 0)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"equiqc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
