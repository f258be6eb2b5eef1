"""The exclusion decision on generator families its calibration never saw, at failure rates 0 %, 5 % and 20 %.

Inputs: the work folder of ``equiqc calibrate`` (its pairs of several generator families, ``data/injected.csv``
naming each pair's family), one or more failure pools run with the same setting (``--failures``: folders whose
``data/injected.csv`` names each pair's family and failure kind, built with
:func:`equiqc.workflows.demo.build_family_cohort`) and, with ``--good``, a pool of good pairs within the model's
range (else the calibration's own pairs, which reach past it, are the good pairs). ``--make-pools WORK
--calibration FILE`` builds and runs them first with the calibration's setting (resumed when already there):
``WORK/good`` (12 pairs per family at strengths 0.25-1, seed 3000) and ``WORK/failuresA``, ``WORK/failuresB``
(each failure kind once per family, seeds 2000 and 2001); run seed 1000. For each family F left out:

1. the feature calibration is fitted on the other families' good pairs exactly as ``equiqc calibrate`` fits it
   (:func:`equiqc.pipeline.calibration.fit_feature_calibration`);
2. cohorts are drawn from F's good pairs (of ``--good``, else of the calibration run) plus
   ``round(r / (1 - r) * good)`` of F's failures (at least one for ``r > 0``; ``--draws`` cohorts per rate), and
   the decision is made on each exactly as ``equiqc run`` makes it
   (:func:`equiqc.pipeline.calibration.apply_calibration`, :func:`equiqc.pipeline.decision.decide`), so the
   cohort rules (outlier, similarity) see the cohort they would see;
3. recorded per rate: the fraction of each failure kind excluded (over the draws that held it), the fraction of
   good pairs excluded, and the false alarms (good pairs whose true mean error is within ``--tolerance-mm`` but are
   excluded: the calibration families reach past what the model recovers, so some good pairs are rightly excluded),
   and the bound's coverage on F's good pairs.

Prints the table (per rate: per kind, and good pairs; pooled over the left-out families) and writes it as JSON.

    python benchmarks/shift_decisions.py --calibration-run /tmp/cal/default-2anat \
        --make-pools /tmp/cal --calibration /tmp/cal/default.json --draws 300 \
        --out docs/validation/shift_decisions_default.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from equiqc.pipeline.calibration import TARGET, apply_calibration, feature_matrix, fit_feature_calibration
from equiqc.pipeline.decision import DecisionRules, decide
from equiqc.workflows.calibrate import calibration_rows

RATES = (0.0, 0.05, 0.2)
KINDS = ("extreme_deformation", "large_rotation", "contrast_inversion", "missing_slab", "heavy_noise",
         "other_subject")


def make_pools(work: Path, calibration: str, families: list[str]) -> tuple[Path, list[Path]]:
    """Build and run (or resume) the good pool and two failure pools with the calibration's setting."""
    from decision_rates import config_of

    from equiqc.storage.calibration import read_calibration
    from equiqc.workflows.demo import build_family_cohort, family_plan
    from equiqc.workflows.run import run_cohort

    config = dataclasses.replace(config_of(read_calibration(calibration)["setting"], calibration, batch_size=1,
                                           workers=None), seed=1000)  # the run seed of the calibration's cohort
    pools = {"good": (family_plan(families, 12, (0.25, 1.0), 3000), 3000),
             "failuresA": (family_plan(families, 0, (1.0, 1.0), 2000, kinds=KINDS), 2000),
             "failuresB": (family_plan(families, 0, (1.0, 1.0), 2001, kinds=KINDS), 2001)}
    for name, (plan, seed) in pools.items():
        cohort = build_family_cohort(work / name, plan, seed=seed)
        run_cohort(cohort.manifest, work / name, config)
    return work / "good", [work / "failuresA", work / "failuresB"]


def run_rows(folder: Path) -> list[dict]:
    """The report rows of a run folder with each pair's ``family`` and ``kind`` from its ``data/injected.csv``."""
    frame = pd.read_parquet(folder / "report.parquet")
    injected = pd.read_csv(folder / "data" / "injected.csv").set_index("pair_id")
    rows = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in frame.to_dict("records")]
    return [dict(r, family=injected.loc[r["pair_id"], "family"], kind=injected.loc[r["pair_id"], "kind"],
                 pool=folder.name) for r in rows]


def decide_cohort(rows: list[dict], calibration, rules: DecisionRules) -> list[dict]:
    rows = [dict(r) for r in rows]
    return decide(apply_calibration(rows, calibration), rules)


def measure_family(good: list[dict], failures: list[dict], calibration, rules: DecisionRules, draws: int,
                   rng: np.random.Generator) -> list[dict]:
    lines = []
    for rate in RATES:
        n_fail = min(max(round(rate / (1 - rate) * len(good)), 1 if rate else 0), len(failures))
        kinds: dict[str, list[bool]] = {}
        good_excluded, false_alarms = [], []
        for _ in range(draws if n_fail else 1):
            chosen = [failures[i] for i in rng.choice(len(failures), n_fail, replace=False)] if n_fail else []
            decided = decide_cohort(good + chosen, calibration, rules)
            for r in decided[len(good):]:
                kinds.setdefault(r["kind"], []).append(bool(r["flagged"]))
            flags = np.array([r["flagged"] for r in decided[:len(good)]])
            within = np.array([float(r[TARGET]) <= rules.tolerance_mm for r in good])
            good_excluded.append(flags.mean())
            false_alarms.append(flags[within].mean() if within.any() else np.nan)
        lines.append({"target_rate": rate, "good": len(good), "failures": n_fail,
                      "realised_rate": n_fail / (n_fail + len(good)),
                      "excluded_by_kind": {k: float(np.mean(v)) for k, v in sorted(kinds.items())},
                      "cohorts_by_kind": {k: len(v) for k, v in sorted(kinds.items())},
                      "good_excluded": float(np.mean(good_excluded)),
                      "false_alarms": float(np.nanmean(false_alarms)),
                      "good_within_tolerance": int(sum(float(r[TARGET]) <= rules.tolerance_mm for r in good))})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-run", required=True, help="equiqc calibrate's work folder")
    parser.add_argument("--failures", nargs="+", help="the failure pools' run folders")
    parser.add_argument("--make-pools", metavar="WORK", help="build and run the good and failure pools in WORK first")
    parser.add_argument("--calibration", help="with --make-pools: the calibration file whose setting they run with")
    parser.add_argument("--good", help="a run folder of good pairs within the model's range (default: the "
                        "calibration run's pairs)")
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--tolerance-mm", type=float, default=3.0)
    parser.add_argument("--draws", type=int, default=300, help="random cohorts per family and rate (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()
    rules = DecisionRules(tolerance_mm=args.tolerance_mm)
    rng = np.random.default_rng(args.seed)
    cal_rows = run_rows(Path(args.calibration_run))
    if args.make_pools:
        if not args.calibration:
            parser.error("--make-pools needs --calibration (the setting the pools run with)")
        args.good, args.failures = make_pools(Path(args.make_pools), args.calibration,
                                              sorted({r["family"] for r in cal_rows}))
    if not args.failures:
        parser.error("give --failures, or --make-pools")
    good_all = calibration_rows([r for r in cal_rows if r["kind"] == "good"],
                                {r["pair_id"]: r["family"] for r in cal_rows})
    pool = [r for folder in args.failures for r in run_rows(Path(folder)) if r["status"] == "complete"]
    good_rows = good_all
    if args.good:
        rows = run_rows(Path(args.good))
        good_rows = calibration_rows([r for r in rows if r["kind"] == "good"],
                                     {r["pair_id"]: r["family"] for r in rows})
    table = {}
    for family in sorted({r["family"] for r in good_all}):
        fit = [r for r in good_all if r["family"] != family]
        calibration = fit_feature_calibration(feature_matrix(fit), [r[TARGET] for r in fit],
                                              np.array([r["family"] for r in fit]), args.coverage)
        good = [r for r in good_rows if r["family"] == family]
        failures = [r for r in pool if r["family"] == family]
        table[family] = measure_family(good, failures, calibration, rules, args.draws, rng)
        alone = decide_cohort(good, calibration, rules)
        upper = np.array([r["expected_error_upper_mm"] for r in alone])
        table[family].append({"coverage_good": float(np.mean(np.array([r[TARGET] for r in good]) <= upper)),
                              "failures_alone": [
                                  {k: r.get(k) for k in ("pool", "pair_id", "kind", TARGET, "expected_error_mm",
                                                         "expected_error_upper_mm", "calibration_in_range",
                                                         "similarity_ncc", "similarity_lncc", "flag_reasons")}
                                  for r in (decide_cohort(good + [f], calibration, rules)[-1] for f in failures)]})
    pooled = []
    for i, rate in enumerate(RATES):
        lines = [table[f][i] for f in table]
        kinds = sorted({k for line in lines for k in line["excluded_by_kind"]})
        pooled.append({"target_rate": rate,
                       "excluded_by_kind": {k: float(np.mean([line["excluded_by_kind"][k] for line in lines
                                                              if k in line["excluded_by_kind"]])) for k in kinds},
                       "good_excluded": float(np.mean([line["good_excluded"] for line in lines])),
                       "false_alarms": float(np.mean([line["false_alarms"] for line in lines]))})
    for family, lines in table.items():
        for line in lines[:-1]:
            print(family, json.dumps({k: v for k, v in line.items() if k != "cohorts_by_kind"}, default=str))
        print(family, "coverage of the bound on its good pairs:", round(lines[-1]["coverage_good"], 3))
        for f in lines[-1]["failures_alone"]:
            print("   ", json.dumps(f, default=str))
    for line in pooled:
        print("pooled", json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps({"calibration_run": args.calibration_run, "failures": args.failures,
                                              "rules": vars(rules), "per_family": table, "pooled": pooled},
                                             indent=1, default=str))


if __name__ == "__main__":
    main()
