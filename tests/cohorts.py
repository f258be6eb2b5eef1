"""Small synthetic cohorts on disk (NIfTI + manifest.csv) for end-to-end runs that must be quick."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from equiqc.storage.nifti import save_volume

TESTS = Path(__file__).resolve().parent
NEAR_FREE_MODEL = "python:doubles:ZeroDisplacement"  # needs TESTS on PYTHONPATH (workers inherit it)


def tiny_cohort(folder: Path, pairs: int = 4, shape=(20, 22, 18), unreadable: tuple[int, ...] = (),
                seed: int = 0, empty_mask: tuple[int, ...] | None = None) -> Path:
    """``pairs`` subject-to-atlas pairs of smooth random volumes (2 mm voxels); the pairs listed in
    ``unreadable`` get a corrupt source file (an ingest failure). With ``empty_mask``, every pair gets a
    target mask (the central box), empty for the pairs listed. Returns the manifest path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas = gaussian_filter(rng.random(shape), 2).astype(np.float32)
    save_volume(folder / "atlas.nii.gz", atlas, affine)
    rows = ["subject_id,source,target" + (",target_mask" if empty_mask is not None else "")]
    if empty_mask is not None:
        box = np.zeros(shape, np.uint8)
        box[3:-3, 3:-3, 3:-3] = 1
        save_volume(folder / "mask.nii.gz", box, affine)
        save_volume(folder / "empty_mask.nii.gz", np.zeros(shape, np.uint8), affine)
    for i in range(pairs):
        name = f"sub-{i:03d}.nii.gz"
        if i in unreadable:
            (folder / name).write_bytes(b"not a NIfTI file")
        else:
            save_volume(folder / name, (atlas + 0.1 * gaussian_filter(rng.random(shape), 2)).astype(np.float32),
                        affine)
        mask = "" if empty_mask is None else ("," + ("empty_mask.nii.gz" if i in empty_mask else "mask.nii.gz"))
        rows.append(f"sub-{i:03d},{name},atlas.nii.gz{mask}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"
