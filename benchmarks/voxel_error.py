"""Does the per-voxel error estimate ``error_mm`` beat ``std_mm``? Leave-one-family-out on a calibration cohort.

Input: the work folder of ``equiqc calibrate`` (its stores and ``data/injected.csv``, each pair's family). The
same functions as ``equiqc calibrate`` (:func:`equiqc.workflows.calibrate.voxel_samples`,
:func:`equiqc.pipeline.voxel_error.fit_and_judge`): per family left out, the voxel model fitted on the other
families' pairs against ``std_mm`` alone and the two no-perturbation baselines (the local mismatch, the nonlinear
deformation) on the family's pairs, by the voxel Spearman correlation with the true error and the sparsification
nAURC (0 = the oracle's order, 1 = chance), medians over the family's pairs. Here to re-judge a finished cohort
(another seed, more voxels) without re-running it.

    python benchmarks/voxel_error.py --run /tmp/cal/default-families --out docs/validation/voxel_error_default.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from equiqc.pipeline.voxel_error import fit_and_judge
from equiqc.workflows.calibrate import calibration_rows, voxel_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the calibration cohort's work folder")
    parser.add_argument("--samples", type=int, default=4000, help="voxels per pair to fit on (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the table and the all-family model as JSON here")
    args = parser.parse_args()
    run = Path(args.run)
    report = pd.read_parquet(run / "report.parquet").to_dict("records")
    injected = pd.read_csv(run / "data" / "injected.csv")
    good = injected[injected.kind == "good"]
    rows = calibration_rows(report, dict(zip(good.pair_id, good.family, strict=True)))
    model, table = fit_and_judge(voxel_samples(run, rows, args.seed), args.samples, args.seed)
    for line in table:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in line.items()}))
    print("all families:", json.dumps(model.to_dict()))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "table": table, "model": model.to_dict()}, indent=1))


if __name__ == "__main__":
    main()
