"""Cost of the estimator itself (perturb, compose, statistics) per sample, with a model that costs ~nothing.

The "model" returns the physical alignment of the two grids (no computation), so the timings are the
estimator's own overhead on top of any real model's forward. Prints seconds per sample per stage and the
peak device memory, for a given grid size, K, batch size and perturbation family.

    python benchmarks/estimator_stages.py --shape 160 192 224 --samples 32 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
from equiqc.pipeline.perturbations import PerturbationConfig


class NullModel:
    name = "null"
    stochastic = False
    input_shape = None

    def __init__(self, device):
        self.device = torch.device(device)

    def register(self, source, target, source_affine=None, target_affine=None):
        m = torch.linalg.inv(source_affine) @ target_affine
        return T.affine_map(m, target.shape[2:]).expand(source.shape[0], -1, *target.shape[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--perturbation", default="rigid")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    shape = tuple(args.shape)
    src = torch.rand(1, 1, *shape)
    affine = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    model = NullModel(args.device)
    cfg = EstimatorConfig(samples=args.samples, batch_size=args.batch_size,
                          perturbation=PerturbationConfig(kind=args.perturbation))
    estimate_uncertainty(model, src, src, affine, affine, EstimatorConfig(samples=2, batch_size=2))  # warm-up
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    res = estimate_uncertainty(model, src, src, affine, affine, cfg)
    wall = time.perf_counter() - start
    n = args.samples + 1
    out = {"shape": shape, "device": str(model.device), "K": args.samples, "B": args.batch_size,
           "perturbation": args.perturbation, "wall_s": round(wall, 3),
           "per_sample_ms": {k: round(1000 * v / n, 2) for k, v in res.timings_s.items()}}
    if model.device.type == "cuda":
        out["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
