"""``equiqc fmriprep FMRIPREP_DIR OUT participant|group``: QC of fMRIPrep's / sMRIPrep's normalisations, a BIDS App.

* **participant**: each subject's (and session's) ``desc-preproc_T1w`` is a pair with the template it was
  normalised to (``--space``, default ``MNI152NLin2009cAsym``; ``--target``/``--target-mask``, default the template
  in a local TemplateFlow folder, :func:`~equiqc.storage.fmriprep.templateflow_template`), and fMRIPrep's own
  ``from-T1w_to-<space>_mode-image_xfm.h5`` is the pair's prediction (the manifest's ``transform`` column). The K
  perturbed registrations replay fMRIPrep's registration with ANTs (``--model ants``, preset ``fmriprep``;
  ``--sloppy``: ``fmriprep-sloppy``, fMRIPrep's ``--sloppy`` setting), so each subject gets the spread of that
  registration and its file's distance from what the replay reproduces (``transform_deviation_*_mm``, reason
  ``deviation``). A subject missing a file is a failed pair naming it; the rest run. Derivatives as ``equiqc
  bids`` writes them.
* **group**: the cohort decision (``decisions.tsv``, ``exclude.tsv``, ``report.html``) over every subject run so far.
"""

from __future__ import annotations

from pathlib import Path

from equiqc.storage.bids import BidsError
from equiqc.storage.fmriprep import DEFAULT_SPACE, discover_fmriprep, select_fmriprep, templateflow_template
from equiqc.workflows.bids import group_level, run_participants
from equiqc.workflows.config import RunConfig
from equiqc.workflows.logs import LOGGER

__all__ = ["participant_level", "group_level", "fmriprep_config_overrides"]


def fmriprep_config_overrides(sloppy: bool, model: str | None, model_options: dict) -> dict:
    """The model and its options of a replay of fMRIPrep's registration: ``ants`` with preset ``fmriprep``
    (``fmriprep-sloppy`` with ``sloppy``) unless the user named another model or preset."""
    model = model or "ants"
    if model == "ants" and "preset" not in model_options and "parameters" not in model_options:
        model_options = {**model_options, "preset": "fmriprep-sloppy" if sloppy else "fmriprep"}
    return {"model": model, "model_options": model_options}


def participant_level(fmriprep_dir: str | Path, out: str | Path, config: RunConfig, space: str = DEFAULT_SPACE,
                      target: str | Path | None = None, target_mask: str | Path | None = None,
                      participant_labels: list[str] | None = None, argv: list[str] | None = None,
                      shard: tuple[int, int] | None = None):
    """Compute the participants' normalisations (all, or ``shard``'s) and write their derivatives; returns the
    run's summary (see the module)."""
    if target is None:
        if target_mask is not None:
            raise BidsError("--target-mask needs --target (the template it belongs to)")
        target, target_mask = templateflow_template(space)
    for role, path in (("--target", target), ("--target-mask", target_mask)):
        if path is not None and not Path(path).is_file():
            raise BidsError(f"{role} {path}: file not found")
    every = discover_fmriprep(fmriprep_dir, space)
    chosen = select_fmriprep(every, participant_labels, fmriprep_dir)
    for anat in chosen:
        if anat.missing:
            LOGGER.warning(f"{anat.stem}: missing {', '.join(anat.missing)}; its pair is reported as failed")
    rows = []
    for anat in every:
        row = {"subject_id": anat.subject_id, "pair_id": anat.stem, "source": str(anat.t1w),
               "target": str(Path(target).resolve()), "transform": str(anat.transform)}
        row |= {"source_mask": str(anat.mask)} if anat.mask.is_file() else {}
        row |= {"target_mask": str(Path(target_mask).resolve())} if target_mask else {}
        rows.append(row)
    subjects = {a.subject_id for a in chosen} if participant_labels else None
    return run_participants(rows, {a.stem: a.image for a in every}, Path(out), config, target, space, fmriprep_dir,
                            argv, shard, subjects)
