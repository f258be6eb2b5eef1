"""Validation of the ANTs backend (docs/models/ants.md): does the spread of perturbed ANTs registrations track
ANTs' error, catch failed registrations, and tell a pipeline's transform file from a wrong one?

``--part table``: synthetic subject->template pairs with known maps on nilearn's MNI152 2009 template at 2 mm
(:func:`validation.make_pairs`: affine only, deformable only, both; ``--pairs`` each), ``--samples`` K in each
of ``--kinds``: voxel Spearman and sparsification nAURC of std_mm with ANTs' true error inside the brain and over
the whole field, beside the three baselines that need no perturbation (validation.py's), pair-level Spearman of
the risk score with the true mean error, seconds per registration; on the "both" pairs, K = 8 against K = 16
(the change of std_mm and the voxel metrics).

``--part cohort``: the demo's cohort (``--cohort-pairs`` pairs, ``--failure-fraction`` of them injected failures,
the four kinds in turn: extreme deformation, large rotation, corrupted image, wrong image). Per pair, ANTs' own
registration is written by antspyx as a composite ``.h5`` (what a pipeline leaves behind), and three wrong transform
files beside it: another subject's, one from the source with a left-right flipped header (the array mirrored, the
header kept), and a truncated registration (SyN stopped after five iterations at its coarsest level). Each file is
read exactly as ``equiqc run`` reads the manifest's ``transform`` column
(:func:`equiqc.storage.transform_files.read_transform_map`); the K perturbed registrations run once per pair with
the own file as the prediction, and each file's deviation from their mean is measured
(:func:`equiqc.pipeline.scores.transform_deviation`). The decision (:func:`equiqc.pipeline.decision.decide`) over
the cohort given its own files: AUROC of the risk score for the injected failures and the reasons; then the fraction
of pairs flagged ``deviation`` when every pair is given each kind of file.

    python benchmarks/ants_validation.py --part table --pairs 4 --samples 16 --out docs/models/ants
    python benchmarks/ants_validation.py --part cohort --cohort-pairs 10 --samples 8 --work /tmp/ants-cohort \
        --out docs/models/ants
    python benchmarks/ants_validation.py --part cohort --cohort-pairs 8 --failure-fraction 0.5 --seed 1 \
        --samples 8 --work /tmp/ants-cohort-failures --out docs/models/ants
    python benchmarks/ants_validation.py --summarise docs/models/ants/cohort_*.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from validation import GT_TYPES, baseline_maps, make_pairs, median_iqr, voxel_metrics

from equiqc.pipeline.backends.ants import AntsRegistration, console_to
from equiqc.pipeline.decision import DecisionRules, decide
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
from equiqc.pipeline.perturbations import PerturbationConfig, pair_seed
from equiqc.pipeline.scores import auroc, map_error_mm, pair_summary, spearman, transform_deviation
from equiqc.storage.nifti import load_volume
from equiqc.storage.transform_files import read_transform_map
from equiqc.workflows.demo import _templates, build_demo_cohort


def _log(msg: str, start: float) -> None:
    print(f"  [{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)


def table(args, start: float) -> dict:
    t1, affine, brain, _ = _templates("mni")
    model = AntsRegistration()
    out: dict = {"lines": [], "k8_vs_k16": {}}
    for gt in args.gt:
        pairs = list(make_pairs(gt, args.pairs, seed=100 + list(GT_TYPES).index(gt), t1=t1, affine=affine))
        for kind in args.kinds:
            cfg = EstimatorConfig(samples=args.samples, batch_size=1, perturbation=PerturbationConfig(kind=kind),
                                  covariance=False)
            per_pair, rows, seconds = [], [], []
            for i, (src, truth) in enumerate(pairs):
                res = estimate_uncertainty(model, src, t1, affine, affine, cfg, seed=i)
                seconds.append(res.timings_s["forward"] / (args.samples + 1))
                err = map_error_mm(res.prediction_map, truth, affine)
                per_pair.append(voxel_metrics(res.std_mm, err, baseline_maps(res.prediction_map, t1, affine), brain))
                rows.append({"status": "complete", **pair_summary(res, affine, brain, None, truth)})
                _log(f"{gt} {kind} pair {i + 1}/{len(pairs)}: error {rows[-1]['true_error_mean_mm']:.2f} mm, "
                     f"std {rows[-1]['uncertainty_mean_mm']:.3f} mm", start)
                if gt == "both" and kind == args.kinds[0] and args.samples != 8:
                    half = estimate_uncertainty(model, src, t1, affine, affine,
                                                EstimatorConfig(samples=8, batch_size=1,
                                                                perturbation=PerturbationConfig(kind=kind),
                                                                covariance=False), seed=i)
                    region = brain & np.isfinite(res.std_mm) & np.isfinite(half.std_mm)
                    out["k8_vs_k16"].setdefault("rel_change", []).append(
                        float(np.abs(half.std_mm[region] - res.std_mm[region]).mean() / res.std_mm[region].mean()))
                    out["k8_vs_k16"].setdefault("k8", []).append(voxel_metrics(half.std_mm, err, {}, brain))
                    out["k8_vs_k16"].setdefault("k16", []).append(voxel_metrics(res.std_mm, err, {}, brain))
            decide(rows)
            err_mean = np.array([r["true_error_mean_mm"] for r in rows])
            line = {"gt": gt, "perturbation": kind, "samples": args.samples, "pairs": len(rows),
                    "voxel": {"/".join(k): median_iqr([p[k] for p in per_pair]) for k in per_pair[0]},
                    "pair_spearman_risk_error": round(spearman(np.array([r["risk_score"] for r in rows]),
                                                               err_mean), 3),
                    "pair_spearman_mean_std_error": round(spearman(np.array([r["uncertainty_mean_mm"] for r in rows]),
                                                                   err_mean), 3),
                    "true_error_mean_mm": [round(float(e), 3) for e in err_mean],
                    "uncertainty_mean_mm": [round(float(r["uncertainty_mean_mm"]), 3) for r in rows],
                    "tta_error_mean_mm": [round(float(r["tta_error_mean_mm"]), 3) for r in rows],
                    "seconds_per_registration": median_iqr(seconds)}
            out["lines"].append(line)
            print(json.dumps({k: v for k, v in line.items() if k != "voxel"}
                             | {"brain_spearman": line["voxel"]["std/brain/spearman"]}), flush=True)
    if out["k8_vs_k16"]:
        k = out["k8_vs_k16"]
        out["k8_vs_k16"] = {"rel_change": median_iqr(k["rel_change"]),
                            **{f"k{n}/{'/'.join(key)}": median_iqr([m[key] for m in k[f'k{n}']])
                               for n in (8, 16) for key in k["k16"][0]}}
    return out


def _ants_transform(ants, fixed, moving, prefix: str, **options) -> str:
    """antspyx's seeded registration of ``moving`` to ``fixed`` written as a composite .h5; its path."""
    os.environ["ANTS_RANDOM_SEED"] = "1"
    with console_to(Path(prefix + "console.txt")):
        reg = ants.registration(fixed, moving, "SyN", outprefix=prefix, write_composite_transform=True, **options)
    return reg["fwdtransforms"]


def cohort(args, start: float) -> dict:
    import ants

    work = Path(args.work or tempfile.mkdtemp(prefix="equiqc-ants-cohort-"))
    demo = build_demo_cohort(work, pairs=args.cohort_pairs, seed=args.seed, failure_fraction=args.failure_fraction)
    data = demo.manifest.parent
    target = load_volume(data / "atlas.nii.gz")
    brain = load_volume(data / "atlas_brain_mask.nii.gz").data > 0
    model = AntsRegistration()
    fixed = ants.image_read(str(data / "atlas.nii.gz"))
    files: dict[str, dict[str, str]] = {}
    sources = {}
    for pair in demo.truth:
        sid = pair.split("_")[0]
        path = data / f"{sid}_T1w.nii.gz"
        sources[pair] = load_volume(path)
        moving = ants.image_read(str(path))
        flipped = ants.from_numpy(moving.numpy()[::-1].copy(), origin=moving.origin, spacing=moving.spacing,
                                  direction=moving.direction)
        files[pair] = {"own": _ants_transform(ants, fixed, moving, str(work / f"{pair}_own_")),
                       "flipped_header": _ants_transform(ants, fixed, flipped, str(work / f"{pair}_flipped_")),
                       "truncated": _ants_transform(ants, fixed, moving, str(work / f"{pair}_truncated_"),
                                                    reg_iterations=(5, 0, 0))}
        _log(f"{pair}: transform files written", start)
    names = list(demo.truth)
    for i, pair in enumerate(names):
        files[pair]["another_subject"] = files[names[(i + 1) % len(names)]]["own"]
    rows, deviations, own_vs_backend = [], {k: [] for k in ("own", "another_subject", "flipped_header",
                                                             "truncated")}, []
    cfg = EstimatorConfig(samples=args.samples, batch_size=1, perturbation=PerturbationConfig(kind="rigid"),
                          covariance=False)
    for pair in names:
        src = sources[pair]
        truth_file = nib.load(str(data / f"{pair.split('_')[0]}_to_atlas_truth.nii.gz"))
        truth = np.moveaxis(np.asarray(truth_file.dataobj, np.float32).reshape(*target.data.shape, 3), -1, 0)
        given = {k: read_transform_map(f, src, target) for k, f in files[pair].items()}
        res = estimate_uncertainty(model, src.data, target.data, src.affine, target.affine, cfg,
                                   seed=pair_seed(0, pair), prediction=given["own"])
        region = np.flatnonzero((brain & np.isfinite(res.std_mm)).ravel())

        for kind, phi in given.items():
            res.prediction_map = phi
            deviations[kind].append(transform_deviation(res, src.affine, torch.as_tensor(region)))
        res.prediction_map = given["own"]
        summary = pair_summary(res, src.affine, brain, None, truth, source_shape=src.data.shape, source=src.data,
                               target=target.data)
        own_map = model.register_arrays(src.data, src.affine, target.data, target.affine)  # the backend, seed 1
        own_vs_backend.append(float(map_error_mm(given["own"], own_map, src.affine)[brain].max()))
        rows.append({"status": "complete", "pair_id": pair, "kind": demo.truth[pair], **summary})
        _log(f"{pair} ({demo.truth[pair]}): error {summary['true_error_mean_mm']:.2f} mm, std "
             f"{summary['uncertainty_mean_mm']:.3f} mm, deviations p95 "
             + ", ".join(f"{k} {v[-1]['transform_deviation_p95_mm']:.2f}" for k, v in deviations.items()), start)
    rules = DecisionRules()
    decide(rows, rules)
    injected = np.array([r["kind"] != "good" for r in rows])
    risk = np.array([r["risk_score"] for r in rows])
    out = {"samples": args.samples, "pairs": len(rows), "auroc_injected_risk": auroc(risk, injected),
           "pairs_detail": [{k: r.get(k) for k in ("pair_id", "kind", "true_error_mean_mm", "uncertainty_mean_mm",
                                                  "uncertainty_p95_mm", "risk_score", "similarity_ncc",
                                                  "flag_reasons")} for r in rows],
           "own_file_vs_backend_max_mm": max(own_vs_backend), "deviation": {}}
    for kind, values in deviations.items():
        p95 = np.array([v["transform_deviation_p95_mm"] for v in values])
        mean = np.array([v["transform_deviation_mean_mm"] for v in values])
        out["deviation"][kind] = {"p95_mm": median_iqr(p95), "mean_mm": median_iqr(mean),
                                  "p95_mm_each": [round(float(x), 3) for x in p95],
                                  "flagged_fraction": float((p95 > rules.deviation_mm).mean())}
    own = np.array([v["transform_deviation_p95_mm"] for v in deviations["own"]])
    for kind in ("another_subject", "flipped_header", "truncated"):
        wrong = np.array([v["transform_deviation_p95_mm"] for v in deviations[kind]])
        out["deviation"][kind]["auroc_vs_own"] = auroc(np.concatenate([wrong, own]),
                                                       np.r_[np.ones(len(wrong), bool), np.zeros(len(own), bool)])
    print(json.dumps({k: v for k, v in out.items() if k != "pairs_detail"}), flush=True)
    return out


def summarise(path: Path) -> dict:
    """A cohort result re-decided with this equiqc's rules: per kind of transform file, the fraction of pairs flagged
    'deviation' (:func:`equiqc.pipeline.decision.decide` on each pair's spread and that file's deviation)."""
    saved = json.loads(path.read_text())
    out = {}
    for kind, values in saved["deviation"].items():
        rows = [{"status": "complete", "n_region_voxels": 1, "folding_fraction": 0.0,
                 "uncertainty_mean_mm": pair["uncertainty_mean_mm"], "uncertainty_p95_mm": pair["uncertainty_p95_mm"],
                 "transform_deviation_p95_mm": p95}
                for pair, p95 in zip(saved["pairs_detail"], values["p95_mm_each"], strict=True)]
        decide(rows, DecisionRules())
        out[kind] = {"flagged_deviation": sum("deviation" in r["flag_reasons"] for r in rows), "pairs": len(rows),
                     "p95_mm_min_max": [min(values["p95_mm_each"]), max(values["p95_mm_each"])]}
    return {"file": str(path), "deviation_mm": DecisionRules().deviation_mm, "kinds": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("table", "cohort"))
    p.add_argument("--summarise", nargs="+", type=Path, help="re-decide saved cohort results with today's rules")
    p.add_argument("--pairs", type=int, default=4, help="table: pairs per ground-truth type")
    p.add_argument("--gt", nargs="+", choices=list(GT_TYPES), default=list(GT_TYPES))
    p.add_argument("--kinds", nargs="+", default=["rigid"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--cohort-pairs", type=int, default=10)
    p.add_argument("--failure-fraction", type=float, default=0.2, help="cohort: injected failures (the demo's kinds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="cohort: folder for its images and transform files (default: a new temporary one)")
    p.add_argument("--out", default="docs/models/ants")
    args = p.parse_args()
    if args.summarise:
        for path in args.summarise:
            print(json.dumps(summarise(path)))
        return
    if args.part is None:
        p.error("give --part table|cohort, or --summarise FILE")
    start = time.perf_counter()
    result = {"args": vars(args)}
    result.update(table(args, start) if args.part == "table" else cohort(args, start))
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_".join(args.kinds) if args.part == "table" else f"k{args.samples}_fail{args.failure_fraction:g}"
    (out / f"{args.part}_{suffix}.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({"done": str(out / f"{args.part}_{suffix}.json"), "elapsed_s": result["elapsed_s"]}))


if __name__ == "__main__":
    main()
