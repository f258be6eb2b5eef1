"""BIDS datasets in: the anatomical images of a dataset, with their subject and session, as equiqc pairs.

Indexing uses ancpbids, chosen by measured start-up time (``benchmarks/bids_libraries.py``: a fresh process
imports the library, indexes a synthetic 300-subject dataset and lists its 400 T1w images; median of 3 on a
2-core machine with another job running: ancpbids 1.19 s, bids2table 2.45 s, pybids 7.87 s); it also has no
dependencies of its own. Its validator is not used: it applies
raw-dataset rules to derivatives and asks for metadata no dataset holds (e.g. ``Genetics``), so equiqc checks
what it needs itself: ``dataset_description.json`` with ``Name`` and ``BIDSVersion``, and at least one
matching image.

A pair is one image (``--suffix``, default ``T1w``, datatype ``anat``) registered to the target template. Its
``pair_id`` is the image's entities without the suffix (``sub-01_ses-02_acq-mprage``), so every session (and
acquisition, run...) is its own row; ``subject_id`` is ``sub-<label>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from equiqc.errors import UserError

ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "run", "echo", "part", "chunk")


class BidsError(UserError, ValueError):
    """A BIDS dataset equiqc cannot use; the message names the folder and what to do."""


@dataclass(frozen=True)
class BidsImage:
    path: Path
    entities: dict[str, str]  # ancpbids short names: sub, ses, acq, run...
    suffix: str

    @property
    def subject_id(self) -> str:
        return f"sub-{self.entities['sub']}"

    @property
    def session(self) -> str:
        return self.entities.get("ses", "")

    @property
    def stem(self) -> str:
        """``sub-01_ses-02_acq-x``: the image's entities in BIDS order, without suffix and extension."""
        order = [k for k in ENTITY_ORDER if k in self.entities] + sorted(set(self.entities) - set(ENTITY_ORDER))
        return "_".join(f"{k}-{self.entities[k]}" for k in order)


def image_from_name(path: str | Path, subject_id: str) -> BidsImage:
    """A :class:`BidsImage` from a file name alone (manifest mode): its ``key-value`` entities and last suffix
    (``sub-01_ses-2_T1w.nii.gz``); a name without ``sub-`` takes the manifest's subject id (letters and digits)."""
    stem = Path(path).name.split(".")[0]
    parts = stem.split("_")
    suffix = parts[-1] if "-" not in parts[-1] else "T1w"
    entities = dict(re.findall(r"(?:^|_)([A-Za-z0-9]+)-([A-Za-z0-9]+)", stem))
    if "sub" not in entities:
        entities = {"sub": re.sub(r"[^A-Za-z0-9]", "", subject_id.removeprefix("sub-")) or "unknown", **entities}
    return BidsImage(Path(path), entities, suffix)


def _strip(labels: list[str] | None, prefix: str) -> set[str] | None:
    return {label.removeprefix(prefix) for label in labels} if labels else None


def dataset_description(bids_dir: Path) -> dict:
    path = bids_dir / "dataset_description.json"
    if not path.is_file():
        raise BidsError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json); give the dataset's root "
                        "folder")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BidsError(f"{path}: not readable JSON ({exc})") from exc
    missing = [k for k in ("Name", "BIDSVersion") if not (isinstance(description, dict) and description.get(k))]
    if missing:
        raise BidsError(f"{path}: required field {missing[0]!r} is missing (BIDS requires Name and BIDSVersion)")
    return description


def discover(bids_dir: str | Path, participant_labels: list[str] | None = None,
             session_labels: list[str] | None = None, suffix: str = "T1w") -> list[BidsImage]:
    """The raw dataset's ``anat`` images with ``suffix`` (``.nii``/``.nii.gz``; nothing under ``derivatives/``),
    optionally only the given participants and sessions (labels with or without ``sub-``/``ses-``), sorted by
    path. BidsError when the folder is not a BIDS dataset, a participant label is not in it, or nothing
    matches."""
    return select_participants(_index(bids_dir, session_labels, suffix), participant_labels, bids_dir, suffix,
                               session_labels)


def _index(bids_dir: str | Path, session_labels: list[str] | None, suffix: str) -> list[BidsImage]:
    """Every participant's matching images (see :func:`discover`), indexed once with ancpbids."""
    import ancpbids

    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise BidsError(f"{bids_dir}: no such folder (give the BIDS dataset's root folder)")
    dataset_description(bids_dir)
    layout = ancpbids.BIDSLayout(str(bids_dir))
    wanted_sessions = _strip(session_labels, "ses-")
    images = []
    # scope "raw": never the images of derivatives/ (fMRIPrep's desc-preproc_T1w, or equiqc's own OUT there)
    for artifact in layout.get(suffix=suffix, extension=[".nii", ".nii.gz"], return_type="object", scope="raw"):
        path = Path(artifact.get_absolute_path())
        if path.parent.name != "anat":
            continue
        entities = {k: str(v) for k, v in artifact.get_entities().items()}
        if "sub" not in entities:
            continue
        if wanted_sessions is not None and entities.get("ses") not in wanted_sessions:
            continue
        images.append(BidsImage(path, entities, suffix))
    return sorted(images, key=lambda i: str(i.path))


def select_participants(images: list[BidsImage], participant_labels: list[str] | None, bids_dir: str | Path,
                        suffix: str = "T1w", session_labels: list[str] | None = None) -> list[BidsImage]:
    """The images of the given participants (all when None), from :func:`discover`'s list: no second index.
    BidsError when a participant has no image or nothing is left."""
    wanted_subjects, wanted_sessions = _strip(participant_labels, "sub-"), _strip(session_labels, "ses-")
    chosen = [i for i in images if wanted_subjects is None or i.entities["sub"] in wanted_subjects]
    if wanted_subjects:
        absent = sorted(wanted_subjects - {i.entities["sub"] for i in chosen})
        if absent:
            raise BidsError(f"{bids_dir}: participant {absent[0]!r} has no anat/*_{suffix}.nii[.gz] image "
                            f"(with the sessions asked for)")
    if not chosen:
        raise BidsError(f"{bids_dir}: no anat/*_{suffix}.nii[.gz] image matches"
                        + (f" participants {sorted(wanted_subjects)}" if wanted_subjects else "")
                        + (f" sessions {sorted(wanted_sessions)}" if wanted_sessions else "")
                        + "; check the labels and --suffix")
    return chosen
