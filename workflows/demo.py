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

from equiqc.pipeline import transforms as T
from equiqc.pipeline.scores import auroc
from equiqc.pipeline.synthetic import (
    FAILURES,
    draw_pair_map,
    rigidly_moved,  # noqa: F401 (tests, examples)
    wide_intensity,
    with_rotation,
    with_velocity,
)
from equiqc.pipeline.synthetic import demo_intensity as _intensity  # noqa: F401 (benchmarks' name)
from equiqc.pipeline.synthetic import subject_map as _subject_map
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
    out, (t1, affine, brain, labels) = _write_atlas(out, atlas, mask)
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
        if kind in ("corrupted", "wrong_image"):
            img = FAILURES["contrast_inversion" if kind == "wrong_image" else kind].image(img, gen, None)
        rows.append(_write_pair(out, f"sub-{i + 1:03d}", img, inv, affine, labels is not None))
        truth[rows[-1]["pair_id"]] = kind
    return _write_manifest(out, rows, [{"pair_id": p, "kind": k} for p, k in truth.items()])


def _write_atlas(out: str | Path, atlas: str | Path, mask: str | Path | None):
    """``(data folder, (t1, affine, brain, labels))``: the template written as the cohort's target."""
    out = Path(out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    t1, affine, brain, labels = _templates(atlas, mask)
    save_volume(out / "atlas.nii.gz", t1, affine)
    save_volume(out / "atlas_brain_mask.nii.gz", brain.astype(np.uint8), affine)
    if labels is not None:
        save_volume(out / "atlas_tissue_labels.nii.gz", labels, affine)
    return out, (t1, affine, brain, labels)


def _write_pair(out: Path, sid: str, img: np.ndarray, inv, affine: np.ndarray, labels: bool) -> dict:
    """Write a subject image and its true map (subject -> atlas, source voxels); its manifest row."""
    save_volume(out / f"{sid}_T1w.nii.gz", img.astype(np.float32), affine)
    save_volume(out / f"{sid}_to_atlas_truth.nii.gz", np.moveaxis(inv[0].float().numpy(), 0, -1), affine)
    return ({"subject_id": sid, "pair_id": f"{sid}_to_atlas", "source": f"{sid}_T1w.nii.gz",
             "target": "atlas.nii.gz", "target_mask": "atlas_brain_mask.nii.gz",
             "ground_truth": f"{sid}_to_atlas_truth.nii.gz"}
            | ({"target_labels": "atlas_tissue_labels.nii.gz"} if labels else {}))


def _write_manifest(out: Path, rows: list[dict], injected: list[dict]) -> DemoCohort:
    """The manifest and ``injected.csv`` (one line per pair: ``pair_id``, ``kind`` ("good" or a failure), and
    for family cohorts the family, strength and intensity draws)."""
    import pandas as pd

    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)
    pd.DataFrame(injected).to_csv(out / "injected.csv", index=False)
    return DemoCohort(manifest, {r["pair_id"]: r["kind"] for r in injected})


def other_anatomy(atlas: str | Path, t1: np.ndarray, affine: np.ndarray, centred: bool = True) -> np.ndarray:
    """Another person's brain on the template's grid: MultiPropReg's adult atlas (needs ``equiqc[multipropreg]``)
    resampled by world coordinates, its centre of mass moved onto the template's (``centred``: a second anatomy
    for calibration cohorts; else where its own header puts it, for the ``other_subject`` failure), scaled to the
    template's intensity range. For MultiPropReg's own atlas: the MNI152 2009 template."""
    from equiqc.errors import require

    if atlas == "multipropreg":
        other, other_affine, *_ = _templates("mni")
    else:
        require("MultiPropReg", "multipropreg", "the other_subject failure (another anatomy)")
        from equiqc.pipeline.backends.multipropreg import load_atlas

        other, _, other_affine = load_atlas()

    def centre_mm(x, a):
        return (a @ np.r_[np.argwhere(x > 0.1 * x.max()).mean(0), 1.0])[:3]

    m = np.linalg.inv(other_affine) @ affine
    if centred:
        m[:3, 3] += np.linalg.inv(other_affine)[:3, :3] @ (centre_mm(other, other_affine) - centre_mm(t1, affine))
    phi = T.affine_map(torch.as_tensor(m), t1.shape, torch.float64)
    moved = T.warp(torch.as_tensor(other, dtype=torch.float32)[None, None], phi.float())[0, 0].numpy()
    return (moved / max(float(moved.max()), 1e-6) * float(t1.max())).astype(np.float32)


ANATOMIES = {"template": "the template itself",
             "other": "another person's brain on the template's grid (other_anatomy: MultiPropReg's adult atlas "
                      "for the MNI template, the MNI template for MultiPropReg's)"}


def other_anatomy_available(atlas: str | Path) -> bool:
    """Whether :func:`other_anatomy` can give a second anatomy for ``atlas`` here (not for a template file)."""
    from importlib.util import find_spec

    return atlas == "multipropreg" or (atlas == "mni" and find_spec("MultiPropReg") is not None)


def build_family_cohort(out: str | Path, plan: list[dict], seed: int = 0, atlas: str | Path = "mni",
                        mask: str | Path | None = None) -> DemoCohort:
    """Write a cohort of generator-family pairs (NIfTI + manifest.csv + injected.csv) under ``out/data``.

    ``plan``: one dict per pair with ``family`` (:data:`equiqc.pipeline.synthetic.FAMILIES`), ``strength``,
    optionally ``kind`` (a failure of :data:`equiqc.pipeline.synthetic.FAILURES`, default ``good``) and
    ``anatomy`` (:data:`ANATOMIES`: ``template``, the default, or ``other``: the pair's target and source are
    another brain, :func:`other_anatomy`, written as ``other_atlas.nii.gz`` with its mask). Every pair gets
    :func:`equiqc.pipeline.synthetic.wide_intensity`. ``atlas``, ``mask``: as :func:`build_demo_cohort`.
    """
    out, (t1, affine, brain, labels) = _write_atlas(out, atlas, mask)
    gen = torch.Generator().manual_seed(seed)
    other = other_brain = elsewhere = None  # another brain: centred (a second anatomy, its mask), where its header
    # puts it (a failure)
    rows, injected = [], []
    for i, item in enumerate(plan):
        kind, anatomy_name = item.get("kind", "good"), item.get("anatomy", "template")
        failure = FAILURES.get(kind) if kind != "good" else None
        if kind != "good" and failure is None:
            raise ValueError(f"unknown failure kind {kind!r}; known: {', '.join(FAILURES)}")
        if anatomy_name not in ANATOMIES:
            raise ValueError(f"unknown anatomy {anatomy_name!r}; known: {', '.join(ANATOMIES)}")
        if anatomy_name == "other" and other is None:
            other = other_anatomy(atlas, t1, affine)
            other_brain = other > 0.05 * other.max()
            save_volume(out / "other_atlas.nii.gz", other, affine)
            save_volume(out / "other_atlas_brain_mask.nii.gz", other_brain.astype(np.uint8), affine)
        if failure and failure.needs_other and elsewhere is None:
            elsewhere = other_anatomy(atlas, t1, affine, centred=False)
        base, region = (other, other_brain) if anatomy_name == "other" else (t1, brain)
        strength = float(item["strength"]) * (failure.strength if failure else 1.0)
        fwd, inv = draw_pair_map(item["family"], t1.shape, affine, gen, strength, region=region)
        if failure and failure.velocity_mm:
            fwd, inv = with_velocity(fwd, inv, t1.shape, affine, gen, failure.velocity_mm)
        if failure and failure.rotation_deg:
            fwd, inv = with_rotation(fwd, inv, t1.shape, affine, gen, failure.rotation_deg)
        moved = elsewhere if failure and failure.needs_other else base
        img = T.warp(torch.as_tensor(moved)[None, None], fwd.float())[0, 0].numpy()
        img, drawn = wide_intensity(img, gen)
        if failure and failure.image and not failure.needs_other:
            img = failure.image(img, gen, None)
        row = _write_pair(out, f"sub-{i + 1:03d}", img, inv, affine, labels is not None and anatomy_name != "other")
        if anatomy_name == "other":
            row.update(target="other_atlas.nii.gz", target_mask="other_atlas_brain_mask.nii.gz")
        rows.append(row)
        injected.append({"pair_id": row["pair_id"], "kind": kind, "family": item["family"],
                         "anatomy": anatomy_name, "strength": float(item["strength"])} | drawn)
    return _write_manifest(out, rows, injected)


def family_plan(families, pairs_per_family: int, strength: tuple[float, float], seed: int,
                kinds: tuple[str, ...] = (), anatomies: tuple[str, ...] = ("template",)) -> list[dict]:
    """A cohort plan: ``pairs_per_family`` good pairs of each family at strengths drawn uniformly in ``strength``
    (seeded), on ``anatomies`` in turn (:data:`ANATOMIES`), then one pair of each failure kind in ``kinds`` per
    family (at strength 1, on the template)."""
    rng = np.random.default_rng(seed)
    plan = [{"family": f, "strength": float(rng.uniform(*strength))}
            | ({"anatomy": anatomies[j % len(anatomies)]} if anatomies != ("template",) else {})
            for f in families for j in range(pairs_per_family)]
    return plan + [{"family": f, "strength": 1.0, "kind": k} for f in families for k in kinds]


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
