"""What one ANTs registration costs through equiqc's backend, and what a pair costs (K + 1 registrations, or K with
a given transform), per preset and resolution: the 2 mm and 1 mm MNI152 2009 template registered to a rigidly moved
and smoothly warped copy of itself (the demo's generator), one ITK thread, seeded; the median of ``--repeat`` runs.

Also the determinism the backend promises: two seeded runs bit-identical, and the run-to-run scatter of unseeded
runs (mean / max distance between two unseeded maps, mm, inside the brain).

    python benchmarks/ants_cost.py --presets SyN fmriprep-sloppy --resolutions 2 1 --out docs/models/ants/cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.ants import AntsRegistration
from equiqc.pipeline.scores import map_error_mm
from equiqc.workflows.demo import _intensity, _subject_map


def pair(resolution: int):
    tpl = load_mni152_template(resolution=resolution)
    t1, affine = np.asarray(tpl.dataobj, np.float32), np.asarray(tpl.affine, float)
    brain = np.asarray(load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    gen = torch.Generator().manual_seed(5)
    fwd, _ = _subject_map(t1.shape, affine, gen)
    src = _intensity(T.warp(torch.as_tensor(t1)[None, None], fwd.float())[0, 0].numpy(), gen)
    return src, t1, affine, brain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["SyN", "fmriprep-sloppy"])
    p.add_argument("--resolutions", nargs="+", type=int, default=[2, 1])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--samples", type=int, default=8, help="K, for the cost per pair")
    p.add_argument("--out")
    args = p.parse_args()
    lines = []
    for res in args.resolutions:
        src, tgt, affine, brain = pair(res)
        for preset in args.presets:
            seeded = AntsRegistration(preset=preset)
            seconds, maps = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                maps.append(seeded.register_arrays(src, affine, tgt, affine))
                seconds.append(time.perf_counter() - t0)
            unseeded = AntsRegistration(preset=preset, seed=None)
            a, b = (unseeded.register_arrays(src, affine, tgt, affine) for _ in range(2))
            scatter = map_error_mm(a, b, affine)[brain]
            per = float(np.median(seconds))
            line = {"resolution_mm": res, "shape": list(tgt.shape), "preset": preset,
                    "seconds_per_registration": round(per, 2),
                    "seconds_per_pair": round(per * (args.samples + 1), 1), "samples": args.samples,
                    "seeded_bit_identical": bool(all(np.array_equal(maps[0], m) for m in maps[1:])),
                    "unseeded_scatter_mean_mm": round(float(scatter.mean()), 3),
                    "unseeded_scatter_max_mm": round(float(scatter.max()), 3)}
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "lines": lines}, indent=1))


if __name__ == "__main__":
    main()
