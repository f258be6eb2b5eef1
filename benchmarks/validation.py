"""Does the uncertainty track real error? Synthetic ground truth on each model's own atlas.

For each model (``--models``: the shipped ``default`` on nilearn's MNI152 2009 template at 2 mm, and/or
``multipropreg`` on the MultiPropReg package's 1 mm atlas in its true LIA layout), each ground-truth type
(affine only, smooth deformable only, both) and each perturbation family (translation, rigid, affine, scale, shear,
diffeomorphic), on N subject->atlas pairs with a known map:

* voxel level, per pair: Pearson and Spearman correlation between ``std_mm`` and the true error magnitude
  (mm) of the unperturbed prediction, and the sparsification nAURC
  (:func:`~equiqc.pipeline.scores.sparsification_naurc`: 0 = the error's own order, 1 = chance), inside the brain
  mask and over the whole field of view, for ``std_mm`` and for three baselines that need no perturbation
  (distance from the image centre, the prediction's displacement magnitude, the target's gradient magnitude)
  -> median and IQR over pairs (``voxel`` in each line: ``map/region/metric``);
* pair level: Spearman between the risk score and the pair's mean true error; AUROC of the risk score for
  pairs whose mean true error exceeds ``--error-threshold`` mm, and for the worst third of the pairs by
  true error (a failure definition that works for models of any accuracy);
* test-time augmentation: mean error of the mean composed map vs the unperturbed prediction.

Then, for models with dropout: MC-dropout (same K) vs equivariance (rigid) on the "both" pairs (voxel
correlation of the two maps, and of each with the true error); and for each model a K sweep (4..64, the
model's default family or ``--sweep-kind``, on the first ``--sweep-pairs`` "both" pairs) for stability and the
voxel metrics (``--skip-sweep`` leaves it out, ``--skip-table`` runs only these two).

    python benchmarks/validation.py --pairs 20 --samples 4 --out docs/validation
    python benchmarks/validation.py --models default multipropreg --pairs 10 --samples 4 --skip-sweep \
        --out docs/validation/side_by_side
prints JSON lines and writes ``results.json`` into ``--out`` (plots: ``benchmarks/plot_validation.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.decision import decide
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty, mc_dropout_config
from equiqc.pipeline.perturbations import KINDS, PerturbationConfig
from equiqc.pipeline.scores import auroc, map_error_mm, pair_summary, sparsification_naurc, spearman
from equiqc.workflows.config import make_config
from equiqc.workflows.demo import _intensity, _subject_map, _templates

GT_TYPES = {"affine": {"vel_mm": 0.0}, "deformable": {"rot_deg": 0.0, "shift_mm": 0.0, "scale": 0.0, "vel_mm": 3.0},
            "both": {"vel_mm": 2.0}}


def make_pairs(gt: str, n: int, seed: int, t1: np.ndarray, affine: np.ndarray):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opts = dict(GT_TYPES[gt])
        if gt != "deformable":  # a spread of difficulty: some pairs beyond the training range
            opts["rot_deg"] = float(2 + 8 * torch.rand(1, generator=gen))
            opts["shift_mm"] = float(2 + 6 * torch.rand(1, generator=gen))
        fwd, inv = _subject_map(t1.shape, affine, gen, **opts)
        src = T.warp(torch.as_tensor(t1)[None, None], fwd.float())[0, 0].numpy()
        yield _intensity(src, gen), inv[0].float().numpy()


def pearson(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")


def median_iqr(x) -> list[float]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return [round(float(np.median(x)), 3), round(float(np.percentile(x, 25)), 3), round(float(np.percentile(x, 75)), 3)]


ATLAS_OF = {"default": "mni", "multipropreg": "multipropreg"}


def baseline_maps(prediction_map: np.ndarray, target: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Per-voxel maps that need no perturbation, each a candidate predictor of the error (mm or intensity/mm):
    distance from the image centre, the prediction's displacement magnitude, the target's gradient magnitude."""
    grid = T.identity_grid(target.shape, torch.float64)[0].numpy()
    centre = ((np.array(target.shape, float) - 1) / 2).reshape(-1, *([1] * target.ndim))
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    gradient = np.stack(np.gradient(np.asarray(target, float), *spacing))
    return {"centre_distance": map_error_mm(grid, centre, affine),
            "displacement": map_error_mm(np.asarray(prediction_map, float), grid, affine),
            "gradient": np.linalg.norm(gradient, axis=0)}


REGIONS = ("brain", "whole")  # inside the brain mask; the whole field of view (where std_mm is reported)


def voxel_metrics(std: np.ndarray, err: np.ndarray, maps: dict[str, np.ndarray], brain: np.ndarray) -> dict:
    """Voxel Pearson and Spearman with the true error and the sparsification nAURC, of ``std_mm`` and of each
    baseline map, in each of :data:`REGIONS` (both where std_mm is reported)."""
    out = {}
    reported = np.isfinite(std) & np.isfinite(err)
    for region_name, region in zip(REGIONS, (brain & reported, reported), strict=True):
        for name, m in {"std": std, **maps}.items():
            out[(name, region_name, "pearson")] = pearson(m[region], err[region])
            out[(name, region_name, "spearman")] = spearman(m[region], err[region])
            out[(name, region_name, "naurc")] = sparsification_naurc(m[region], err[region])
    return out


def validation_table(name: str, gt: str, model, pairs, t1, affine, brain, args, start: float) -> Iterator[dict]:
    """One line per perturbation family for one model and one ground-truth type's pairs (see module doc)."""
    for kind in args.kinds:
        cfg = EstimatorConfig(samples=args.samples, batch_size=args.batch_size,
                              perturbation=PerturbationConfig(kind=kind))
        rows, per_pair = [], []
        for i, (src, truth) in enumerate(pairs):
            res = estimate_uncertainty(model, src, t1, affine, affine, cfg, seed=i)
            err = map_error_mm(res.prediction_map, truth, affine)
            per_pair.append(voxel_metrics(res.std_mm, err, baseline_maps(res.prediction_map, t1, affine), brain))
            summary = pair_summary(res, affine, brain, None, truth)
            rows.append({"status": "complete", "pair": i, **summary})
            print(f"  {name} {gt} {kind} pair {i + 1}/{len(pairs)}: {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
        decide(rows)
        risk = np.array([r["risk_score"] for r in rows])
        err_mean = np.array([r["true_error_mean_mm"] for r in rows])
        tta = np.array([r["tta_error_mean_mm"] for r in rows])
        worst = err_mean >= np.sort(err_mean)[-max(1, len(err_mean) // 3)]
        voxel = {"/".join(key): median_iqr([p[key] for p in per_pair]) for key in per_pair[0]}
        line = {"model": name, "gt": gt, "perturbation": kind, "samples": args.samples,
                "voxel_pearson": voxel["std/brain/pearson"], "voxel_spearman": voxel["std/brain/spearman"],
                "voxel": voxel, "pair_spearman_risk_error": round(spearman(risk, err_mean), 3),
                "auroc_error_above_threshold": round(auroc(risk, err_mean > args.error_threshold), 3),
                "n_above_threshold": int((err_mean > args.error_threshold).sum()),
                "auroc_worst_third": round(auroc(risk, worst), 3),
                "mean_error_mm": round(float(err_mean.mean()), 3), "tta_error_mm": round(float(tta.mean()), 3),
                "elapsed_s": round(time.perf_counter() - start, 1)}
        line["pairs_detail"] = [{"true_error_mean_mm": round(float(e), 3), "risk_score": round(float(r), 3)}
                                for e, r in zip(err_mean, risk, strict=True)]
        yield line


def mc_dropout_comparison(name: str, model, pairs, t1, affine, brain, args) -> dict:
    """Equivariance (rigid) vs MC-dropout on the same pairs, or why MC-dropout cannot run on this model."""
    try:
        mc = load_backend(name, mc_dropout=True)
    except ValueError as exc:
        return {"not_possible": str(exc)}
    rigid = EstimatorConfig(samples=args.samples, batch_size=args.batch_size, perturbation=PerturbationConfig("rigid"))
    agree, eq_err, mc_err = [], [], []
    for i, (src, truth) in enumerate(pairs):
        a = estimate_uncertainty(model, src, t1, affine, affine, rigid, seed=i)
        b = estimate_uncertainty(mc, src, t1, affine, affine, mc_dropout_config(args.samples, args.batch_size), seed=i)
        region = brain & np.isfinite(a.std_mm) & np.isfinite(b.std_mm)
        err = map_error_mm(a.prediction_map, truth, affine)
        agree.append(spearman(a.std_mm[region], b.std_mm[region]))
        eq_err.append(spearman(a.std_mm[region], err[region]))
        mc_err.append(spearman(b.std_mm[region], err[region]))
    return {"spearman_equivariance_vs_mcdropout": median_iqr(agree),
            "spearman_equivariance_vs_error": median_iqr(eq_err), "spearman_mcdropout_vs_error": median_iqr(mc_err)}


def k_sweep(model, kind: str, pairs, t1, affine, brain, args) -> dict:
    """Stability (mean absolute change of std_mm relative to the K = 64 map, brain) and the voxel metrics of
    :func:`voxel_metrics` (std_mm against the true error, brain and whole field) for K = 4..64, family ``kind``,
    on the first ``--sweep-pairs`` pairs; the baselines' metrics (which do not depend on K) under K = 64."""
    ks = (4, 8, 16, 32, 64)
    sweep = {k: {"metrics": [], "rel_change": []} for k in ks}
    for i, (src, truth) in enumerate(pairs[: args.sweep_pairs]):
        maps = {}
        for k in ks:
            cfg = EstimatorConfig(samples=k, batch_size=args.batch_size, perturbation=PerturbationConfig(kind))
            maps[k] = estimate_uncertainty(model, src, t1, affine, affine, cfg, seed=i)
        region = brain & np.isfinite(maps[64].std_mm)
        err = map_error_mm(maps[64].prediction_map, truth, affine)
        baselines = baseline_maps(maps[64].prediction_map, t1, affine)  # K-independent: measured once, at K = 64
        for k in ks:
            sweep[k]["metrics"].append(voxel_metrics(maps[k].std_mm, err, baselines if k == 64 else {}, brain))
            s = maps[k].std_mm[region]
            sweep[k]["rel_change"].append(float(np.nanmean(np.abs(s - maps[64].std_mm[region]))
                                                / np.nanmean(maps[64].std_mm[region])))
        print(f"  sweep {kind} pair {i + 1}/{min(args.sweep_pairs, len(pairs))}", file=sys.stderr, flush=True)
    out = {}
    for k, v in sweep.items():
        voxel = {"/".join(key if key[0] != "std" else key[1:]): median_iqr([m[key] for m in v["metrics"]])
                 for key in v["metrics"][0]}
        out[k] = {"perturbation": kind, "pairs": len(v["rel_change"]), "voxel_spearman": voxel["brain/spearman"],
                  "voxel": voxel, "rel_change_vs_64": median_iqr(v["rel_change"])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(ATLAS_OF), default=["default"])
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gt", nargs="+", choices=list(GT_TYPES), default=list(GT_TYPES))
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--error-threshold", type=float, default=2.5)
    p.add_argument("--out", default="docs/validation")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--sweep-pairs", type=int, default=3)
    p.add_argument("--sweep-kind", choices=list(KINDS),
                   help="perturbation family of the K sweep (default: the model's, as a run would use)")
    p.add_argument("--skip-table", action="store_true", help="only the MC-dropout comparison and the K sweep")
    p.add_argument("--skip-mc", action="store_true", help="leave out the MC-dropout comparison")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args), "table": [], "mc_dropout": {}, "k_sweep": {}}
    start = time.perf_counter()
    for name in args.models:
        t1, affine, brain, _ = _templates(ATLAS_OF[name])
        model = load_backend(name)
        cached = {}
        for gt in args.gt:
            cached[gt] = list(make_pairs(gt, args.pairs, seed=100 + list(GT_TYPES).index(gt), t1=t1, affine=affine))
            if args.skip_table:
                continue
            for line in validation_table(name, gt, model, cached[gt], t1, affine, brain, args, start):
                results["table"].append(line)
                (out / "results.json").write_text(json.dumps(results, indent=1))  # kept if the run is stopped
                print(json.dumps({k: v for k, v in line.items() if k != "pairs_detail"}), flush=True)
        if "both" in cached and not args.skip_mc:
            results["mc_dropout"][name] = mc_dropout_comparison(name, model, cached["both"], t1, affine, brain, args)
            print(json.dumps({"model": name, "mc_dropout": results["mc_dropout"][name]}), flush=True)
        if not args.skip_sweep and "both" in cached:
            kind = args.sweep_kind or make_config(model=name).perturbation  # as a run of this model would
            results["k_sweep"][name] = k_sweep(model, kind, cached["both"], t1, affine, brain, args)
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(json.dumps({"model": name, "k_sweep": results["k_sweep"][name]}), flush=True)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({"done": str(out / "results.json"), "elapsed_s": results["elapsed_s"]}))


if __name__ == "__main__":
    main()
