"""The ``equiqc`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from pipeline.perturbations import KINDS


def _estimate(args: argparse.Namespace) -> int:
    from pipeline.backends.affine_opt import AffineOptimisation
    from pipeline.estimator import EstimatorConfig, estimate_uncertainty
    from pipeline.perturbations import PerturbationConfig
    from storage.nifti import VolumeError, load_volume, save_volume

    try:
        source, target = load_volume(args.source), load_volume(args.target)
    except VolumeError as exc:
        print(f"equiqc: {exc}", file=sys.stderr)
        return 2
    config = EstimatorConfig(samples=args.samples, batch_size=args.batch_size,
                             perturbation=PerturbationConfig(kind=args.perturbation))
    result = estimate_uncertainty(AffineOptimisation(), source.data, target.data, source.affine, target.affine,
                                  config, seed=args.seed)
    print(f"mean std_mm: {np.nanmean(result.std_mm):.4f} mm over {int((result.n_valid >= 2).sum())} voxels")
    if args.out:
        save_volume(args.out, result.std_mm, target.affine)
        print(f"std_mm map (target grid, RAS+): {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equiqc", description="Registration QC by transformation equivariance.")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="uncertainty of one pair with the affine baseline model")
    est.add_argument("source", help="source image (.nii/.nii.gz)")
    est.add_argument("target", help="target image (.nii/.nii.gz)")
    est.add_argument("--samples", type=int, default=8, help="K perturbations (default 8)")
    est.add_argument("--batch-size", type=int, default=4, help="perturbations per model call (default 4)")
    est.add_argument("--perturbation", choices=KINDS, default="rigid")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--out", help="write the std_mm map to this NIfTI file")
    est.set_defaults(func=_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad option values (validated by the config dataclasses)
        print(f"equiqc: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
