"""``equiqc bids BIDS_DIR OUT participant|group``: a BIDS App.

* **participant**: discover the dataset's anatomical images (:mod:`equiqc.storage.bids`), pair each with the
  target template, and compute the pairs of the participants asked for (``--participant-label``; all by
  default) with the cluster options of ``equiqc run``; each complete pair's derivatives (uncertainty map and
  the checked registration as an ITK/ANTs transform, with JSON sidecars) are written under
  ``OUT/sub-XX/[ses-YY/]anat/`` (:mod:`equiqc.storage.derivatives`). Participants may run side by side (one
  job each) on the same ``OUT``: each holds a lease on its own participants only.
* **group**: the cohort decision over every pair computed so far (``equiqc report OUT``): ``decisions.tsv``,
  ``exclude.tsv`` and ``report.html`` at the top of ``OUT``.

``OUT`` is both a BIDS derivatives dataset and an equiqc run folder (its stores and run files are listed in
``.bidsignore``), so ``equiqc report OUT --ratings ...`` and ``equiqc export OUT ...`` work on it as well. The
manifest (``OUT/manifest.tsv``) always lists the whole dataset (with the ``--session-label`` filter), so the
group level sees every pair, computed or not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from equiqc.storage.bids import BidsError, discover
from equiqc.storage.derivatives import pair_files, write_dataset_description, write_pair_derivatives
from equiqc.storage.manifest import write_manifest
from equiqc.workflows.config import RunConfig
from equiqc.workflows.logs import LOGGER

LEVELS = ("participant", "group")


def space_label(target: str | Path, given: str | None = None) -> str:
    """The BIDS ``space-`` label of the target: ``given``, else the template's ``tpl-`` entity, else its file
    name without extension and non-alphanumerics (``MNI152_T1_2mm.nii.gz`` -> ``MNI152T12mm``)."""
    if given is not None:
        if not re.fullmatch(r"[A-Za-z0-9]+", given):
            raise BidsError(f"--target-space {given!r}: a BIDS label is letters and digits only")
        return given
    name = Path(target).name.split(".")[0]
    match = re.search(r"(?:^|_)tpl-([A-Za-z0-9]+)", name)
    return match.group(1) if match else re.sub(r"[^A-Za-z0-9]", "", name) or "target"


def participant_level(bids_dir: str | Path, out: str | Path, config: RunConfig, target: str | Path,
                      target_mask: str | Path | None = None, target_labels: str | Path | None = None,
                      participant_labels: list[str] | None = None, session_labels: list[str] | None = None,
                      suffix: str = "T1w", space: str | None = None, argv: list[str] | None = None):
    """Compute the participants' pairs and write their derivatives; returns the run's summary."""
    from equiqc.workflows.run import run_cohort

    for role, path in (("--target", target), ("--target-mask", target_mask), ("--target-labels", target_labels)):
        if path is not None and not Path(path).is_file():
            raise BidsError(f"{role} {path}: file not found")
    out, space = Path(out), space_label(target, space)
    every = discover(bids_dir, None, session_labels, suffix)
    chosen = discover(bids_dir, participant_labels, session_labels, suffix) if participant_labels else every
    rows = []
    for image in every:
        row = {"subject_id": image.subject_id, "pair_id": image.stem, "source": str(image.path),
               "target": str(Path(target).resolve())}
        row |= {"target_mask": str(Path(target_mask).resolve())} if target_mask else {}
        row |= {"target_labels": str(Path(target_labels).resolve())} if target_labels else {}
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "manifest.tsv", rows)
    perturbation = config.perturbation_config()
    write_dataset_description(out, bids_dir, {"Description": f"model {config.model}, {perturbation.kind} "
                                              f"perturbations, K={config.samples}"})
    summary = run_cohort(out / "manifest.tsv", out, config, argv=argv, subjects={i.subject_id for i in chosen})
    by_pair = {i.stem: i for i in chosen}
    about = {"Model": config.model, "PerturbationFamily": perturbation.kind, "Samples": config.samples,
             "Target": str(Path(target).resolve()), "SpatialReference": str(Path(target).resolve())}
    for row in summary.rows:
        image = by_pair.get(row["pair_id"])
        if image is None or row["status"] != "complete":
            continue
        files = pair_files(out, image.stem, image.subject_id, image.session, space, suffix)
        source = Path(os.path.relpath(image.path, bids_dir)).as_posix()
        write_pair_derivatives(out, out / "results.zarr", out / "cohort.zarr", row["pair_id"], files,
                               {**about, "Sources": [f"bids:raw:{source}"]})
    LOGGER.info(f"participant level: {len(chosen)} image(s) of {len({i.subject_id for i in chosen})} "
                f"participant(s); derivatives in {out}")
    return summary


def group_level(out: str | Path, tolerance_mm: float | None = None, ratings: str | Path | None = None):
    """The cohort decision over every pair of ``OUT`` (``equiqc report``); returns the report's summary."""
    from equiqc.workflows.run import rebuild_report

    out = Path(out)
    if not (out / "dataset_description.json").is_file() or not (out / "run.json").is_file():
        raise BidsError(f"{out}: no participant-level results; run `equiqc bids BIDS_DIR {out} participant` first")
    return rebuild_report(out, tolerance_mm=tolerance_mm, ratings=ratings)
