"""fMRIPrep / sMRIPrep derivatives in: each anatomical normalisation as an equiqc pair, and the template it went to.

fMRIPrep (and sMRIPrep) write, per subject (and session, when a subject's anatomy is processed per session)::

    sub-01/[ses-1/]anat/sub-01[_ses-1]_desc-preproc_T1w.nii.gz                              the source
    sub-01/[ses-1/]anat/sub-01[_ses-1]_desc-brain_mask.nii.gz                               its brain mask
    sub-01/[ses-1/]anat/sub-01[_ses-1]_from-T1w_to-<space>_mode-image_xfm.h5                the normalisation

The ``.h5`` is an ITK composite transform (affine + displacement field) that ``antsApplyTransforms -i T1w -r
template`` applies: exactly what the manifest's ``transform`` column takes (:mod:`equiqc.storage.transform_files`).
A pair is one ``desc-preproc_T1w``; its ``pair_id`` is the file's entities before ``desc`` (``sub-01_ses-1``). A
subject folder with no ``desc-preproc_T1w``, or a T1w whose transform to ``space`` is missing, is still listed
(:attr:`FmriprepAnat.missing` names the files): its row points at the missing file, so the run reports that pair as
failed with the file's name and computes the rest. The brain mask is optional (the source's mask when present).

The template (``--target``) is never downloaded: :func:`templateflow_template` looks in a local TemplateFlow folder
(``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow``) and otherwise raises one error naming what to pass.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from equiqc.storage.bids import BidsError, BidsImage, dataset_description

PREPROC = "desc-preproc_T1w"
DEFAULT_SPACE = "MNI152NLin2009cAsym"
_ENTITIES = re.compile(r"(?:^|_)([A-Za-z0-9]+)-([A-Za-z0-9]+)")


@dataclass(frozen=True)
class FmriprepAnat:
    """One anatomical normalisation of an fMRIPrep derivatives folder (paths may not exist: see ``missing``)."""

    stem: str  # sub-01[_ses-1][...]: the entities before desc-
    t1w: Path
    mask: Path
    transform: Path
    missing: tuple[str, ...] = field(default=())

    @property
    def subject_id(self) -> str:
        return self.stem.split("_")[0]

    @property
    def image(self) -> BidsImage:
        """The source as a :class:`~equiqc.storage.bids.BidsImage` (entities without ``desc``, suffix T1w), for
        the derivatives' names."""
        return BidsImage(self.t1w, dict(_ENTITIES.findall(self.stem)), "T1w")


def _anat(folder: Path, stem: str, space: str) -> FmriprepAnat:
    t1w = next((folder / f"{stem}_{PREPROC}{ext}" for ext in (".nii.gz", ".nii")
                if (folder / f"{stem}_{PREPROC}{ext}").is_file()), folder / f"{stem}_{PREPROC}.nii.gz")
    mask = folder / f"{stem}_desc-brain_mask.nii.gz"
    transform = folder / f"{stem}_from-T1w_to-{space}_mode-image_xfm.h5"
    missing = tuple(str(p) for p in (t1w, transform) if not p.is_file())  # the mask is optional
    return FmriprepAnat(stem, t1w, mask, transform, missing)


def discover_fmriprep(fmriprep_dir: str | Path, space: str = DEFAULT_SPACE,
                      participant_labels: list[str] | None = None) -> list[FmriprepAnat]:
    """Every subject's (and session's) normalisation to ``space`` in an fMRIPrep/sMRIPrep derivatives folder,
    sorted by stem; only the given participants (labels with or without ``sub-``) when asked. BidsError when the
    folder is not a derivatives dataset, a participant label is not in it, or it holds no subject."""
    root = Path(fmriprep_dir)
    if not root.is_dir():
        raise BidsError(f"{root}: no such folder (give the fMRIPrep output folder holding sub-*/ and "
                        "dataset_description.json)")
    dataset_description(root)
    if not re.fullmatch(r"[A-Za-z0-9]+", space):
        raise BidsError(f"--space {space!r}: a TemplateFlow template name is letters and digits only")
    found: list[FmriprepAnat] = []
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        stems = {(t.parent, t.name.split(f"_{PREPROC}")[0]) for t in subject.glob(f"**/anat/*_{PREPROC}.nii*")}
        if not stems:  # no anatomy was written for this subject: its pair fails, naming the file
            stems = {(subject / "anat", subject.name)}
        found += [_anat(folder, stem, space) for folder, stem in sorted(stems)]
    if not found:
        raise BidsError(f"{root}: no sub-*/ folder; is this an fMRIPrep or sMRIPrep output folder?")
    return select_fmriprep(found, participant_labels, root)


def select_fmriprep(found: list[FmriprepAnat], participant_labels: list[str] | None,
                    root: str | Path) -> list[FmriprepAnat]:
    """The normalisations of the given participants (all when None) from :func:`discover_fmriprep`'s list (no
    second walk of the folder); BidsError naming a participant that has no folder."""
    if not participant_labels:
        return found
    wanted = {label.removeprefix("sub-") for label in participant_labels}
    absent = sorted(wanted - {a.subject_id.removeprefix("sub-") for a in found})
    if absent:
        raise BidsError(f"{root}: participant {absent[0]!r} has no folder sub-{absent[0]}")
    return [a for a in found if a.subject_id.removeprefix("sub-") in wanted]


def templateflow_home() -> Path:
    """The local TemplateFlow folder: ``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow`` (never fetched)."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME") or Path.home() / ".cache" / "templateflow")


def templateflow_template(space: str) -> tuple[Path, Path | None]:
    """``(T1w, brain mask or None)`` of template ``space`` in the local TemplateFlow folder: the 2 mm files when
    there (``res-02``), else 1 mm, else any ``T1w`` of the template. Raises BidsError naming the folder and the
    options to pass when none is there: nothing is downloaded."""
    folder = templateflow_home() / f"tpl-{space}"
    for res in ("_res-02", "_res-2", "_res-01", "_res-1", ""):
        t1w = folder / f"tpl-{space}{res}_T1w.nii.gz"
        if t1w.is_file():
            mask = folder / f"tpl-{space}{res}_desc-brain_mask.nii.gz"
            return t1w, mask if mask.is_file() else None
    raise BidsError(f"template {space}: no tpl-{space}_res-02_T1w.nii.gz (or res-01) in the local TemplateFlow "
                    f"folder {folder} (equiqc downloads nothing): pass --target TEMPLATE_T1w.nii.gz and "
                    f"--target-mask its brain mask (the template fMRIPrep normalised to), or set TEMPLATEFLOW_HOME")
