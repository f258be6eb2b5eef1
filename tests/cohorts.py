"""Small synthetic cohorts on disk (NIfTI + manifest.csv) for end-to-end runs that must be quick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from equiqc.storage.nifti import save_volume

TESTS = Path(__file__).resolve().parent
NEAR_FREE_MODEL = "python:doubles:ZeroDisplacement"  # needs TESTS on PYTHONPATH (workers inherit it)


def tiny_cohort(folder: Path, pairs: int = 4, shape=(20, 22, 18), unreadable: tuple[int, ...] = (),
                seed: int = 0) -> Path:
    """``pairs`` subject-to-atlas pairs of smooth random volumes (2 mm voxels); the pairs listed in
    ``unreadable`` get a corrupt source file (an ingest failure). Returns the manifest path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas = gaussian_filter(rng.random(shape), 2).astype(np.float32)
    save_volume(folder / "atlas.nii.gz", atlas, affine)
    rows = ["subject_id,source,target"]
    for i in range(pairs):
        name = f"sub-{i:03d}.nii.gz"
        if i in unreadable:
            (folder / name).write_bytes(b"not a NIfTI file")
        else:
            save_volume(folder / name, (atlas + 0.1 * gaussian_filter(rng.random(shape), 2)).astype(np.float32),
                        affine)
        rows.append(f"sub-{i:03d},{name},atlas.nii.gz")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"
