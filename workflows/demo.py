"""``equiqc demo``: a synthetic cohort with known answers, run end to end on the default model.

Built from the MNI152 2009 templates that ship inside nilearn (2 mm): the template is the atlas (target);
each subject is the template moved by a random map ``a = affine o exp(v)`` (within the default model's
training range: rotations up to 4 degrees, translations up to 4 mm, scalings up to 4 %, smooth 2 mm
velocity) with its own intensity changes (gamma, bias field, noise). The true map of each pair
(subject -> atlas) is ``a^-1``, written as a ground-truth NIfTI (3 components, source voxels).

About 20 % of the pairs are injected failures, of four kinds in turn:

* ``extreme_deformation``: velocity 4x larger than the training range (~8 mm);
* ``large_rotation``: a 20-25 degree rotation about one axis;
* ``corrupted``: a good subject whose image is truncated (a third of the field of view blanked) and
  buried in noise;
* ``wrong_image``: the subject's image replaced by another contrast (inverted intensities in the head).

Target labels are the template's tissue classes (1 = CSF, 2 = grey matter, 3 = white matter, from the
shipped probability maps), the target mask is the brain mask. With ``--model multipropreg`` the cohort is
built the same way from MultiPropReg's own 1 mm atlas, with its 14 labels as the structures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equiqc.pipeline import transforms as T
from equiqc.pipeline.perturbations import rotation_matrices
from equiqc.pipeline.scores import auroc
from equiqc.storage.manifest import write_manifest
from equiqc.storage.nifti import save_volume

FAILURE_KINDS = ("extreme_deformation", "large_rotation", "corrupted", "wrong_image")
LABEL_NAMES = {1: "csf", 2: "gm", 3: "wm"}


@dataclass
class DemoCohort:
    manifest: Path
    truth: dict[str, str]  # pair_id -> "good" or the failure kind


def _templates(atlas: str | Path = "mni", mask: str | Path | None = None):
    """(T1, affine, brain mask, tissue/structure labels or None) of the demo's atlas: ``mni``, ``multipropreg``
    or a template file (its mask: ``mask``, else the voxels above 5 % of its maximum)."""
    if isinstance(atlas, Path):
        from equiqc.storage.nifti import load_volume

        volume = load_volume(atlas)
        brain = load_volume(mask).data > 0 if mask else volume.data > 0.05 * volume.data.max()
        return volume.data, volume.affine, brain, None
    if atlas == "multipropreg":
        from equiqc.pipeline.backends.multipropreg import load_atlas

        t1, seg, affine = load_atlas()  # its true LIA affine, not the files' identity header
        return t1, affine, t1 > 0.05, seg
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    t1 = load_mni152_template(resolution=2)
    data = lambda img: np.asarray(img.dataobj, dtype=np.float32)  # noqa: E731
    brain = data(load_mni152_brain_mask(resolution=2)) > 0
    gm, wm = data(load_mni152_gm_template(resolution=2)), data(load_mni152_wm_template(resolution=2))
    labels = np.zeros(brain.shape, np.int16)
    labels[brain] = 1
    labels[brain & (gm > 0.5)] = 2
    labels[brain & (wm > 0.5)] = 3
    return data(t1), np.asarray(t1.affine, np.float64), brain, labels


def _subject_map(shape, affine, gen, rot_deg=4.0, shift_mm=4.0, scale=0.04, vel_mm=2.0, axis_rot=None):
    """(map a (1,3,*shape) target->subject voxels, its inverse) for ``a = M o exp(v)``."""
    a = torch.as_tensor(affine)
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64) * 2 - 1  # noqa: E731
    deg = u(1, 3) * rot_deg
    if axis_rot is not None:
        deg = torch.zeros(1, 3, dtype=torch.float64)
        deg[0, axis_rot[0]] = axis_rot[1]
    lin = rotation_matrices(torch.deg2rad(deg), 3)[0] @ torch.diag(1 + u(3) * scale)
    m = T.about_grid_centre(lin, u(3) * shift_mm, shape, a)
    spacing = torch.linalg.norm(a[:3, :3], dim=0).float()
    coarse = torch.randn(1, 3, 7, 8, 7, generator=gen) * (vel_mm / spacing).view(1, 3, 1, 1, 1)
    v = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    fwd = T.apply_affine(m, T.displacement_to_map(T.scaling_and_squaring(v)).double())
    inv = T.sample_map(T.displacement_to_map(T.scaling_and_squaring(-v)).double(),
                       T.affine_map(torch.linalg.inv(m), shape, torch.float64))
    return fwd, inv


def rigidly_moved(data: np.ndarray, affine: np.ndarray, degrees=(3.0, -2.0, 4.0), shift_mm=(4.0, -3.0, 2.0)):
    """``(moved image, true map)``: ``data`` moved by a rigid world transform about the grid centre.

    The true map (source = ``data`` -> target = moved) is in source voxels, ``(3, *shape)`` float64.
    """
    a = torch.as_tensor(affine, dtype=torch.float64)
    rot = rotation_matrices(torch.deg2rad(torch.tensor([degrees], dtype=torch.float64)), 3)[0]
    m = T.about_grid_centre(rot, torch.tensor(shift_mm, dtype=torch.float64), data.shape, a)
    phi = T.affine_map(m, data.shape, torch.float64)
    moved = T.warp(torch.as_tensor(data, dtype=torch.float32)[None, None], phi.float())[0, 0].numpy()
    return moved, phi[0].numpy()


def _intensity(img: np.ndarray, gen: torch.Generator) -> np.ndarray:
    x = torch.as_tensor(img)[None, None]
    gamma = float(torch.exp((torch.rand(1, generator=gen) * 2 - 1) * 0.2))
    bias = F.interpolate(torch.randn(1, 1, 4, 4, 4, generator=gen) * 0.05, size=img.shape, mode="trilinear",
                         align_corners=True)
    hi = float(x.max())
    x = (x.clamp_min(0) / hi) ** gamma * torch.exp(bias) * hi
    x = x + torch.randn(x.shape, generator=gen) * 0.01 * hi
    return x[0, 0].numpy().astype(np.float32)


def build_demo_cohort(out: str | Path, pairs: int = 20, seed: int = 0, failure_fraction: float = 0.2,
                      atlas: str | Path = "mni", mask: str | Path | None = None,
                      strength: tuple[float, float] = (1.0, 1.0), failures_only: bool = False) -> DemoCohort:
    """Write the synthetic cohort (NIfTI + manifest.csv) under ``out/data``.

    ``atlas``: ``mni`` (nilearn's MNI152 2009 at 2 mm, tissue labels csf/gm/wm), ``multipropreg`` (the
    MultiPropReg package's 1 mm skull-stripped atlas and its 14-label segmentation) or a template file (a
    ``Path``; ``mask`` its region, no labels). ``strength = (lo, hi)``: each good pair's map ranges (rotation,
    translation, scaling, velocity) are scaled by a factor drawn uniformly in ``[lo, hi]`` (``(1, 1)``: the
    demo's ranges, drawing nothing extra, so the demo's cohort does not change). ``failures_only``: every pair
    is an injected failure (the four kinds in turn), for measuring the decision.
    """
    out = Path(out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    t1, affine, brain, labels = _templates(atlas, mask)
    save_volume(out / "atlas.nii.gz", t1, affine)
    save_volume(out / "atlas_brain_mask.nii.gz", brain.astype(np.uint8), affine)
    if labels is not None:
        save_volume(out / "atlas_tissue_labels.nii.gz", labels, affine)
    n_fail = pairs if failures_only else int(round(pairs * failure_fraction))
    rng = np.random.default_rng(seed)
    failing = set(rng.choice(pairs, n_fail, replace=False).tolist()) if n_fail else set()
    gen = torch.Generator().manual_seed(seed)
    rows, truth, kind_i = [], {}, 0
    for i in range(pairs):
        kind = "good"
        options = {}
        if i in failing:
            kind = FAILURE_KINDS[kind_i % len(FAILURE_KINDS)]
            kind_i += 1
        if kind == "good" and strength != (1.0, 1.0):
            f = strength[0] + (strength[1] - strength[0]) * float(torch.rand(1, generator=gen))
            options = {"rot_deg": 4.0 * f, "shift_mm": 4.0 * f, "scale": 0.04 * f, "vel_mm": 2.0 * f}
        if kind == "extreme_deformation":
            options = {"vel_mm": 8.0}
        elif kind == "large_rotation":
            options = {"axis_rot": (int(torch.randint(0, 3, (1,), generator=gen)),
                                    float(20 + 5 * torch.rand(1, generator=gen)))}
        fwd, inv = _subject_map(t1.shape, affine, gen, **options)
        img = T.warp(torch.as_tensor(t1)[None, None], fwd.float())[0, 0].numpy()
        img = _intensity(img, gen)
        if kind == "corrupted":
            img[:, : img.shape[1] // 3] = 0.0
            img = img + np.asarray(torch.randn(img.shape, generator=gen)) * 0.3 * img.max()
        elif kind == "wrong_image":
            head = img > 0.1 * img.max()
            img = np.where(head, img.max() - img, 0.0).astype(np.float32)
        sid = f"sub-{i + 1:03d}"
        save_volume(out / f"{sid}_T1w.nii.gz", img.astype(np.float32), affine)
        save_volume(out / f"{sid}_to_atlas_truth.nii.gz", np.moveaxis(inv[0].float().numpy(), 0, -1), affine)
        rows.append({"subject_id": sid, "pair_id": f"{sid}_to_atlas", "source": f"{sid}_T1w.nii.gz",
                     "target": "atlas.nii.gz", "target_mask": "atlas_brain_mask.nii.gz",
                     "ground_truth": f"{sid}_to_atlas_truth.nii.gz"}
                    | ({"target_labels": "atlas_tissue_labels.nii.gz"} if labels is not None else {}))
        truth[f"{sid}_to_atlas"] = kind
    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)
    (out / "injected.csv").write_text("pair_id,kind\n" + "".join(f"{p},{k}\n" for p, k in truth.items()))
    return DemoCohort(manifest, truth)


def demo_summary(rows: list[dict], truth: dict[str, str]) -> dict:
    """How well the run separated the injected failures, and how uncertainty tracked true error."""
    done = [r for r in rows if r["status"] == "complete"]
    risk = np.array([r["risk_score"] for r in done], float)
    injected = np.array([truth[r["pair_id"]] != "good" for r in done])
    out = {"pairs": len(rows), "complete": len(done), "failed": len(rows) - len(done),
           "flagged": sum(bool(r.get("flagged")) for r in done),
           "injected": int(sum(k != "good" for k in truth.values())),
           "auroc_injected": auroc(risk, injected),
           "flagged_injected": sum(bool(r.get("flagged")) for r, bad in zip(done, injected, strict=True) if bad),
           "flagged_good": sum(bool(r.get("flagged")) for r, bad in zip(done, injected, strict=True) if not bad)}
    for kind in FAILURE_KINDS:
        sel = np.array([truth[r["pair_id"]] in (kind, "good") for r in done])
        if sel.any() and (injected & sel).any():
            out[f"auroc_{kind}"] = auroc(risk[sel], injected[sel])
    unc = np.array([r.get("uncertainty_mean_mm", np.nan) for r in done], float)
    err = np.array([r.get("true_error_mean_mm", np.nan) for r in done], float)
    ok = np.isfinite(unc) & np.isfinite(err)
    if ok.sum() >= 3:
        from equiqc.pipeline.scores import spearman

        out["pair_spearman_uncertainty_vs_error"] = spearman(unc[ok], err[ok])
    vox = np.array([r.get("voxel_spearman_std_error", np.nan) for r in done], float)
    if np.isfinite(vox).any():
        out["voxel_spearman_median"] = float(np.nanmedian(vox))
    return out
