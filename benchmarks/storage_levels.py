"""Bytes per pair in results.zarr at each storage level (``--store``), at 2 mm and 1 mm, against the raw std_mm.

One MNI152 2009 pair per resolution (nilearn's template, a rigidly moved copy as source) runs through the
default model (K = 16 at 2 mm; K = 4 at 1 mm to keep the run short: the stored volumes have the same size and
similar smoothness), then its result is written at each level (:mod:`equiqc.storage.levels`) and the pair's
folder is measured on disk. Prints one JSON line per (resolution, level): bytes, and bytes over the raw
float32 std_mm volume (``voxels x 4``), the figure the cohort-scale issue's targets are stated in.

    python benchmarks/storage_levels.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from nilearn.datasets import load_mni152_template

from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import EstimatorConfig, estimate_uncertainty
from equiqc.pipeline.perturbations import PerturbationConfig
from equiqc.storage.levels import STORE_LEVELS
from equiqc.storage.results import write_result
from equiqc.workflows.demo import rigidly_moved


def folder_bytes(path: Path) -> int:
    return sum(os.path.getsize(Path(d) / f) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    backend = load_backend("default")
    for resolution, samples in ((2, 16), (1, 4)):
        template = load_mni152_template(resolution=resolution)
        data, affine = np.asarray(template.dataobj, np.float32), np.asarray(template.affine)
        moved, _ = rigidly_moved(data, affine)
        result = estimate_uncertainty(backend, moved, data, affine, affine,
                                      EstimatorConfig(samples=samples, batch_size=1,
                                                      perturbation=PerturbationConfig(kind="rigid")), seed=0)
        raw = result.std_mm.size * 4
        with tempfile.TemporaryDirectory() as tmp:
            for level in STORE_LEVELS:
                write_result(Path(tmp) / "r.zarr", level, result, affine, {"k": samples}, level=level)
                size = folder_bytes(Path(tmp) / "r.zarr" / level)
                print(json.dumps({"resolution_mm": resolution, "shape": list(result.std_mm.shape), "K": samples,
                                  "level": level, "bytes": size, "raw_std_bytes": raw,
                                  "ratio_to_raw_std": round(size / raw, 3)}), flush=True)


if __name__ == "__main__":
    main()
