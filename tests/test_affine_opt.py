"""The classical affine baseline backend registers a known rigid motion, and the CLI runs it on NIfTI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.affine_opt import AffineOptimisation
from equiqc.pipeline.perturbations import rotation_matrices
from equiqc.workflows.cli import main

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (28, 30, 26)


def blobs() -> np.ndarray:
    g = T.identity_grid(SHAPE, torch.float64)[0].numpy()
    out = np.zeros(SHAPE)
    for c, s in [((10, 12, 11), 4.0), ((18, 16, 14), 3.0), ((13, 20, 9), 2.5)]:
        out += np.exp(-sum((g[i] - c[i]) ** 2 for i in range(3)) / (2 * s**2))
    return out.astype(np.float32)


def moved_pair():
    src = blobs()
    rot = rotation_matrices(torch.deg2rad(torch.tensor([[0.0, 0.0, 4.0]], dtype=torch.float64)), 3)[0]
    a = torch.as_tensor(AFFINE)
    moved = T.about_grid_centre(rot, torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64), SHAPE, a)
    phi = T.affine_map(moved, SHAPE, torch.float64)
    tgt = T.warp(torch.as_tensor(src)[None, None], phi.float())[0, 0].numpy()
    return src, tgt, phi


def test_affine_optimisation_recovers_a_rigid_motion():
    src, tgt, phi = moved_pair()
    model = AffineOptimisation(iterations=80)
    pred = model.register(torch.as_tensor(src)[None, None], torch.as_tensor(tgt)[None, None],
                          torch.as_tensor(AFFINE), torch.as_tensor(AFFINE))
    assert pred.shape == (1, 3, *SHAPE)
    err = 2.0 * (pred.double() - phi).norm(dim=1)[0, 4:-4, 4:-4, 4:-4]
    ident = 2.0 * (T.identity_grid(SHAPE, torch.float64) - phi).norm(dim=1)[0, 4:-4, 4:-4, 4:-4]
    assert err.mean() < 0.25 * ident.mean()


def test_cli_estimate_on_nifti_files(tmp_path, capsys):
    src, tgt, _ = moved_pair()
    nib.save(nib.Nifti1Image(src, AFFINE), str(tmp_path / "s.nii.gz"))
    nib.save(nib.Nifti1Image(tgt, AFFINE), str(tmp_path / "t.nii.gz"))
    rc = main(["estimate", str(tmp_path / "s.nii.gz"), str(tmp_path / "t.nii.gz"), "--samples", "3",
               "--out", str(tmp_path / "std.nii.gz")])
    assert rc == 0
    assert "mean std_mm" in capsys.readouterr().out
    std = nib.load(str(tmp_path / "std.nii.gz"))
    assert std.shape == SHAPE and np.isfinite(np.asarray(std.dataobj)).any()


def test_cli_reports_a_missing_file(tmp_path, capsys):
    rc = main(["estimate", str(tmp_path / "nope.nii.gz"), str(tmp_path / "t.nii.gz")])
    assert rc == 2
    assert "nope.nii.gz: file not found" in capsys.readouterr().err
