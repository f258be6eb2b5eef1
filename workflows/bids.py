"""``equiqc bids BIDS_DIR OUT participant|group``: a BIDS App.

* **participant**: discover the dataset's anatomical images (:mod:`equiqc.storage.bids`), pair each with the
  target template, and compute the pairs of the participants asked for (``--participant-label``; all by
  default) with the cluster options of ``equiqc run``; each complete pair's derivatives (uncertainty map and
  the checked registration as an ITK/ANTs transform, with JSON sidecars) are written under
  ``OUT/sub-XX/[ses-YY/]anat/`` (:mod:`equiqc.storage.derivatives`). Participants named with
  ``--participant-label`` may run side by side (one job each) on the same ``OUT``: each holds a lease on its
  own participants only; ``--shard I/N`` splits the dataset's pairs the same way. Without labels or shard the
  participant level computes the whole dataset and also writes the cohort decision.
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

from equiqc.storage import run_folder as RF
from equiqc.storage.bids import BidsError, BidsImage, discover, image_from_name, select_participants
from equiqc.storage.derivatives import pair_files, write_dataset_description, write_pair_derivatives
from equiqc.storage.manifest import write_manifest
from equiqc.workflows.config import RunConfig
from equiqc.workflows.logs import LOGGER


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
                      suffix: str = "T1w", space: str | None = None, argv: list[str] | None = None,
                      shard: tuple[int, int] | None = None):
    """Compute the participants' pairs (or shard ``(I, N)`` of the dataset's pairs) and write their derivatives;
    returns the run's summary."""
    for role, path in (("--target", target), ("--target-mask", target_mask), ("--target-labels", target_labels)):
        if path is not None and not Path(path).is_file():
            raise BidsError(f"{role} {path}: file not found")
    out, space = Path(out), space_label(target, space)
    every = discover(bids_dir, None, session_labels, suffix)  # indexed once; the participants are picked from it
    chosen = select_participants(every, participant_labels, bids_dir, suffix, session_labels)
    rows = []
    for image in every:
        row = {"subject_id": image.subject_id, "pair_id": image.stem, "source": str(image.path),
               "target": str(Path(target).resolve())}
        row |= {"target_mask": str(Path(target_mask).resolve())} if target_mask else {}
        row |= {"target_labels": str(Path(target_labels).resolve())} if target_labels else {}
        rows.append(row)
    subjects = {i.subject_id for i in chosen} if participant_labels else None
    return run_participants(rows, {i.stem: i for i in every}, out, config, target, space, bids_dir, argv, shard,
                            subjects)


def run_participants(rows: list[dict], images: dict[str, BidsImage], out: Path, config: RunConfig,
                     target: str | Path, space: str, source_dataset: str | Path, argv: list[str] | None,
                     shard: tuple[int, int] | None, subjects: set[str] | None):
    """The participant level of a BIDS App over manifest ``rows`` (the whole dataset, so the group level sees every
    pair): computes ``subjects``' pairs (None: all, or ``shard``'s) into ``out`` and writes each complete pair's
    derivatives (``images``: pair id -> its source image); returns the run's summary."""
    from equiqc.workflows.run import run_cohort

    if shard and subjects is not None:
        raise BidsError("give --participant-label or --shard, not both (both split the dataset's pairs)")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "manifest.tsv", rows)
    # labels: a lease per participant named (jobs per participant run side by side); no labels: the whole
    # dataset (or its shard) under one lease, and a whole run also writes the cohort decision
    summary = run_cohort(out / "manifest.tsv", out, config, argv=argv, shard=shard, subjects=subjects)
    complete = [r["pair_id"] for r in summary.rows if r["status"] == "complete"]
    write_derivatives(out, out, {p: images[p] for p in complete}, config, target, space, source_dataset)
    LOGGER.info(f"participant level: {len(summary.rows)} image(s); derivatives in {out}")
    return summary


def write_derivatives(run_dir: str | Path, out: str | Path, images: dict[str, BidsImage], config: RunConfig,
                      target: str | Path, space: str, source_dataset: str | Path) -> list[Path]:
    """The derivative files of complete pairs (``pair_id -> its source image``) of the run folder ``run_dir``,
    written under ``out`` (:mod:`equiqc.storage.derivatives`)."""
    run_dir, perturbation = Path(run_dir), config.perturbation_config()
    write_dataset_description(out, source_dataset, {"Description": f"model {config.model}, {perturbation.kind} "
                                                    f"perturbations, K={config.samples}"})
    about = {"Model": config.model, "PerturbationFamily": perturbation.kind, "Samples": config.samples,
             "Target": str(Path(target).resolve()), "SpatialReference": str(Path(target).resolve())}
    written = []
    for pair_id, image in images.items():
        files = pair_files(out, image.stem, image.subject_id, image.session, space, image.suffix)
        source = Path(os.path.relpath(image.path, source_dataset)).as_posix()
        written += write_pair_derivatives(out, RF.results_store(run_dir), RF.cohort_store(run_dir), pair_id, files,
                                          {**about, "Sources": [f"bids:raw:{source}"]})
    return written


def export_derivatives(run_dir: str | Path, out: str | Path, pair_ids: list[str]) -> list[Path]:
    """``equiqc export --layout bids``: a manifest-mode run's pairs as BIDS derivatives under ``out``; entities come
    from the source file names (``sub-01_ses-2_T1w.nii.gz``) or the manifest's subject id."""
    from equiqc.storage.manifest import read_manifest
    from equiqc.workflows.config import config_from_record

    run_dir = Path(run_dir)
    info = RF.read_run_record(run_dir, "export needs a folder `equiqc run` wrote")
    specs = {s.pair_id: s for s in read_manifest(info["manifest"])}
    unknown = [p for p in pair_ids if p not in specs]
    if unknown:
        raise BidsError(f"pair {unknown[0]!r} is not in the run's manifest {info['manifest']}")
    written = []
    for target, group in _by_target([specs[p] for p in pair_ids]).items():
        images = {s.pair_id: image_from_name(s.source, s.subject_id) for s in group}
        written += write_derivatives(run_dir, out, images, config_from_record(info["config"]), target,
                                     space_label(target), Path(info["manifest"]).parent)
    return written


def _by_target(specs) -> dict[Path, list]:
    groups: dict[Path, list] = {}
    for spec in specs:
        groups.setdefault(spec.target, []).append(spec)
    return groups


def group_level(out: str | Path, tolerance_mm: float | None = None, ratings: str | Path | None = None):
    """The cohort decision over every pair of ``OUT`` (``equiqc report``); returns the report's summary."""
    from equiqc.workflows.run import rebuild_report

    out = Path(out)
    if not (out / "dataset_description.json").is_file() or not RF.has_run_record(out):
        raise BidsError(f"{out}: no participant-level results; run `equiqc bids BIDS_DIR {out} participant` first")
    return rebuild_report(out, tolerance_mm=tolerance_mm, ratings=ratings)
