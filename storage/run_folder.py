"""The run folder (``equiqc run --out DIR``): the one place that knows its files' names, and ``run.json``.

==================  ================================================================================
``cohort.zarr``     the ingested inputs (:mod:`equiqc.storage.cohort`)
``results.zarr``    per-pair results (:mod:`equiqc.storage.results`)
``run.json``        the run's record: manifest, configuration, result key, provenance, calibration
``report.parquet``  one row per pair (:mod:`equiqc.storage.report`); ``subjects.parquet`` beside it
``decisions.tsv``   the decision, and ``exclude.tsv``, ``ratings.tsv`` (:mod:`equiqc.storage.decisions`)
``report.html``     the HTML report, its figures in ``figures/``
``crash/``          a failed pair's error and traceback; ``logs/`` a model's console output per pair
``equiqc.log``      everything logged by the runs into this folder
==================  ================================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

from equiqc.errors import UserError
from equiqc.storage.atomic import write_text_atomic

COHORT = "cohort.zarr"
RESULTS = "results.zarr"
RUN_RECORD = "run.json"


class NotARunFolder(UserError, ValueError):
    """A folder without ``run.json`` given where a run folder is needed."""


def cohort_store(out_dir: str | Path) -> Path:
    return Path(out_dir) / COHORT


def results_store(out_dir: str | Path) -> Path:
    return Path(out_dir) / RESULTS


def has_run_record(out_dir: str | Path) -> bool:
    return (Path(out_dir) / RUN_RECORD).is_file()


def read_run_record(out_dir: str | Path, hint: str = "run `equiqc run` first") -> dict:
    """``DIR/run.json``; :class:`NotARunFolder` (saying ``hint``) when there is none."""
    path = Path(out_dir) / RUN_RECORD
    if not path.is_file():
        raise NotARunFolder(f"{out_dir} has no {RUN_RECORD}; it is not an equiqc run folder ({hint})")
    return json.loads(path.read_text())


def write_run_record(out_dir: str | Path, record: dict) -> Path:
    """Write ``DIR/run.json`` atomically (a reader never sees half of it)."""
    return write_text_atomic(Path(out_dir) / RUN_RECORD, json.dumps(record, indent=2))
