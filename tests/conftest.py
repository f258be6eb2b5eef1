"""Shared fixtures: real anatomy from the MNI152 template shipped inside nilearn's wheel (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import transforms as T
from pipeline.perturbations import _rotation


def moved_template(resolution: int, degrees=(3.0, -2.0, 4.0), shift_mm=(4.0, -3.0, 2.0)):
    """(source, target, affine, true map, brain mask): target = template moved rigidly about its centre."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    tpl = load_mni152_template(resolution=resolution)
    data = np.asarray(tpl.dataobj, dtype=np.float32)
    affine = np.asarray(tpl.affine, dtype=np.float64)
    a = torch.as_tensor(affine)
    rot = _rotation(torch.deg2rad(torch.tensor([degrees], dtype=torch.float64)), 3)[0]
    c = T.grid_centre_mm(data.shape, a)
    world = T.matrix_from_parts(rot, c - rot @ c + torch.tensor(shift_mm, dtype=torch.float64))
    phi = T.affine_map(T.voxel_matrix_from_world(world, a), data.shape, torch.float64)
    target = T.warp(torch.as_tensor(data)[None, None], phi.float())[0, 0].numpy()
    brain = np.asarray(load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    return data, target, affine, phi[0].numpy(), brain


@pytest.fixture(scope="session")
def mni_pair_2mm():
    return moved_template(2)


@pytest.fixture(scope="session")
def mni_pair_4mm():
    return moved_template(4)


def error_mm(phi: np.ndarray, truth: np.ndarray, affine: np.ndarray, region: np.ndarray) -> float:
    """Mean distance (mm) between two maps in source voxels, over a region of the target grid."""
    diff = np.einsum("ij,j...->i...", affine[:3, :3], phi - truth)
    return float(np.linalg.norm(diff, axis=0)[region].mean())
