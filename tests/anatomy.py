"""Real anatomy for tests: the MNI152 template shipped inside nilearn's wheel (offline), rigidly moved."""

from __future__ import annotations

import numpy as np

from equiqc.pipeline.scores import map_error_mm
from equiqc.workflows.demo import rigidly_moved


def moved_template(resolution: int, degrees=(3.0, -2.0, 4.0), shift_mm=(4.0, -3.0, 2.0)):
    """(source, target, affine, true map, brain mask): target = template moved rigidly about its centre."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    tpl = load_mni152_template(resolution=resolution)
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    affine = np.asarray(tpl.affine, dtype=np.float64)
    target, truth = rigidly_moved(data, affine, degrees, shift_mm)
    brain = np.asarray(load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    return data, target, affine, truth, brain


def error_mm(phi: np.ndarray, truth: np.ndarray, affine: np.ndarray, region: np.ndarray) -> float:
    """Mean distance (mm) between two maps in source voxels, over a region of the target grid."""
    return float(map_error_mm(phi, truth, affine)[region].mean())
