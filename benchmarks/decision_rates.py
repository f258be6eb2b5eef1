"""How good is the exclusion decision at failure rates 0 %, 5 %, 20 % and 50 %? Measured for one calibration.

Inputs: a calibration file written by ``equiqc calibrate`` (its ``held_out`` pairs were not used to fit it, and
their run is in the calibration's work folder) and a pool of injected failures built here with the demo's
generator (``--failures`` pairs, the four kinds in turn: extreme deformation, large rotation, corrupted
image, wrong image) and run through ``equiqc run`` with the same setting and that calibration.

For each target failure rate ``r`` the cohort is the held-out good pairs plus ``round(r / (1 - r) * good)``
failures (at least one for ``r > 0``) drawn at random from the pool (``--draws`` times; the realised rate is
printed). The decision
(calibrated expected error, reasons, cohort context) is recomputed on each cohort exactly as ``equiqc run``
does (:func:`equiqc.pipeline.calibration.apply_calibration`, :func:`equiqc.pipeline.decision.decide`), so
the cohort-dependent reasons (outlier, similarity) see the cohort they would see. Reported per rate (mean over
draws): AUROC and AUPRC (scikit-learn's average precision) of ``risk_score`` and of
``expected_error_upper_mm`` for injected vs good, the fraction of failures flagged, the fraction of good pairs
flagged (in the clean cohort: pairs flagged with no failure present), the false alarms (good pairs whose true
mean error is within ``tolerance_mm`` but are flagged; good pairs over the tolerance are rightly flagged: the
calibration cohort's maps go up to twice the demo's ranges), and the coverage of the upper bound on the good
pairs (their true mean error at or under it). ``--good-run`` takes the good pairs from another run of the same
setting instead (e.g. the demo's, all within the default model's training range). Then, per failure, the
reasons that flag it when it is the only failure among the good pairs.

    python benchmarks/decision_rates.py --calibration pipeline/backends/calibrations/default.json \
        --failures 12 --work /tmp/rates-default --out docs/validation/decision_rates_default.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from equiqc.pipeline.calibration import TARGET, apply_calibration, calibration_from_dict
from equiqc.pipeline.decision import decide
from equiqc.storage.calibration import read_calibration
from equiqc.workflows.config import RunConfig
from equiqc.workflows.demo import build_demo_cohort
from equiqc.workflows.run import run_cohort

RATES = (0.0, 0.05, 0.2, 0.5)


def config_of(setting: dict, calibration: str, batch_size: int, workers: int | None) -> RunConfig:
    """The RunConfig of a calibration's setting (the run then checks it matches, weights included)."""
    perturbation = dict(setting["perturbation"])
    return RunConfig(model=setting["model"], model_options=setting["model_options"], method=setting["method"],
                     perturbation=perturbation.pop("kind"), perturbation_options=perturbation,
                     samples=setting["samples"], draws=setting["draws"], batch_size=batch_size, workers=workers,
                     calibration=calibration)


def stored_rows(folder: Path, pair_ids: set[str] | None = None) -> list[dict]:
    frame = pd.read_parquet(folder / "report.parquet")
    if pair_ids is not None:
        frame = frame[frame.pair_id.isin(pair_ids)]
    return [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in frame.to_dict("records")]


def measure(good: list[dict], failures: list[dict], calibration, config: RunConfig, draws: int,
            seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    table = []
    for rate in RATES:
        n_fail = min(max(round(rate / (1 - rate) * len(good)), 1 if rate else 0), len(failures))
        stats: dict[str, list[float]] = {}
        for _ in range(draws if 0 < n_fail < len(failures) else 1):
            chosen = [failures[i] for i in rng.choice(len(failures), n_fail, replace=False)] if n_fail else []
            rows = [dict(r, injected=False) for r in good] + [dict(r, injected=True) for r in chosen]
            decide(apply_calibration(rows, calibration), config.decision_rules())
            injected = np.array([r["injected"] for r in rows])
            flagged = np.array([r["flagged"] for r in rows])
            risk = np.nan_to_num(np.array([r["risk_score"] for r in rows], float), nan=99.0)  # failed: worst
            upper = np.nan_to_num(np.array([r["expected_error_upper_mm"] for r in rows], float), nan=1e9)
            error = np.array([r.get(TARGET, np.nan) for r in rows], float)
            within = ~injected & (error <= config.tolerance_mm)  # good pairs whose true error is within tolerance
            values = {"good_flagged": flagged[~injected].mean(),
                      "good_over_tolerance": np.mean(error[~injected] > config.tolerance_mm),
                      "false_alarms": flagged[within].mean() if within.any() else np.nan,
                      "coverage_good": np.mean(error[~injected] <= upper[~injected])}
            if n_fail:
                values |= {"failures_flagged": flagged[injected].mean(),
                           "auroc_risk": roc_auc_score(injected, risk), "auprc_risk":
                           average_precision_score(injected, risk), "auroc_upper": roc_auc_score(injected, upper),
                           "auprc_upper": average_precision_score(injected, upper),
                           "auprc_chance": injected.mean()}
            for k, v in values.items():
                stats.setdefault(k, []).append(float(v))
        table.append({"target_rate": rate, "good": len(good), "failures": n_fail,
                      "realised_rate": n_fail / (n_fail + len(good)), **{k: float(np.mean(v)) for k, v in
                                                                           stats.items()}})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", required=True, help="calibration file (equiqc calibrate)")
    parser.add_argument("--failures", type=int, default=12, help="injected failures in the pool (default 12)")
    parser.add_argument("--work", required=True, help="folder for the failure pool and its run")
    parser.add_argument("--draws", type=int, default=200, help="random cohorts per failure rate (default 200)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--seed", type=int, default=2000, help="seed of the failure pool (default 2000)")
    parser.add_argument("--good-run", help="take the good pairs from this run folder of the same setting (its "
                        "data/injected.csv marks them, as equiqc demo writes it) instead of the calibration's "
                        "held-out pairs")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args()

    record = read_calibration(args.calibration)
    calibration = calibration_from_dict(record["calibration"])
    if not args.good_run and "held_out" not in record:
        parser.error(f"{args.calibration} has no held-out pairs (a family calibration: every pair fitted it); give "
                     "--good-run, or measure it on held-out families with benchmarks/shift_decisions.py")
    config = config_of(record["setting"], args.calibration, args.batch_size, args.workers)
    template = record["cohort"]["template"]
    atlas = template if template in ("mni", "multipropreg") else Path(template)
    pool = build_demo_cohort(args.work, pairs=args.failures, seed=args.seed, atlas=atlas,
                             mask=record["cohort"].get("template_mask"), failures_only=True)
    summary = run_cohort(pool.manifest, args.work, config)
    failures = [dict(r, kind=pool.truth[r["pair_id"]]) for r in summary.rows]
    if args.good_run:  # another run of the same setting, e.g. equiqc demo: its pairs injected as "good"
        kinds = pd.read_csv(Path(args.good_run) / "data" / "injected.csv").set_index("pair_id")["kind"]
        good = stored_rows(Path(args.good_run), set(kinds[kinds == "good"].index))
    else:  # the calibration's held-out pairs
        good = stored_rows(Path(record["cohort"]["work"]), {p["pair_id"] for p in record["held_out"]["pairs"]})
    table = measure(good, failures, calibration, config, args.draws, args.seed)
    per_failure = []
    for failure in failures:  # each failure alone among the good pairs: which reasons catch it
        rows = decide(apply_calibration([dict(r) for r in good] + [dict(failure)], calibration),
                      config.decision_rules())
        r = rows[-1]
        per_failure.append({k: r.get(k) for k in ("pair_id", "kind", "status", TARGET, "uncertainty_mean_mm",
                                                   "expected_error_upper_mm", "similarity_ncc", "flag_reasons")})
    for line in table:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()}))
    for line in per_failure:
        print(json.dumps(line, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps({"calibration": str(args.calibration), "setting": record["setting"],
                                              "good_from": args.good_run or "held-out calibration pairs",
                                              "rates": table, "failures": per_failure}, indent=1, default=str))


if __name__ == "__main__":
    main()
