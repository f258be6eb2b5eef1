"""What runs on the workers: ingest one pair, estimate one pair, write its results. Only paths and small rows
travel between machines.

Two graph shapes (:func:`equiqc.workflows.run._execute` chooses):

* CPU workers (one thread each): :func:`pairs_task`, :func:`pair_task` (ingest, estimate, summarise, write, one
  after another) for one pair or, in a large cohort, a few pairs in one task: every Dask task costs the client and
  the worker several ms of CPU (about 6 ms of wall per task with 2 workers on 2 cores, a /tmp benchmark of 2,100
  empty tasks), a sizeable share of a small pair's 100 ms; a second task per pair would only add to it and
  transfer the ingest outcome between workers.
* GPU workers (two threads, one ``GPU`` resource): three tasks per pair, so the GPU never waits for the CPU:
  :func:`ingest_task` and :func:`write_task` (Zarr writes) run on the worker's second thread while
  :func:`estimate_task` (read, forwards, statistics, and the pair's summaries on the GPU, :func:`summarise`)
  holds the GPU; the estimate stays in the worker's memory
  (:class:`Estimated`) until its write task, which Dask runs on the same worker (its dependency is there) and
  ahead of further ingests (priority).

The model is loaded once per worker process (``_BACKENDS``), on that worker's device (the GPU dask-cuda
pinned it to, else the CPU), and reused by every estimation task the worker runs.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import equiqc
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import UncertaintyResult, estimate_uncertainty
from equiqc.pipeline.estimator_config import EstimatorConfig
from equiqc.pipeline.perturbations import pair_seed
from equiqc.pipeline.scores import pair_summary
from equiqc.storage import results as R
from equiqc.storage.cohort import IngestOutcome, ingest_and_keep, ingest_pair, read_pair
from equiqc.storage.manifest import PairSpec
from equiqc.workflows.config import RunConfig

_BACKENDS: dict = {}


def worker_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_backend(config: RunConfig):
    """The worker process's backend for this configuration (loaded on first use, then cached)."""
    device = worker_device()
    key = (config.model, config.weights, config.method, repr(sorted(config.model_options.items())), device)
    if key not in _BACKENDS:
        _BACKENDS[key] = load_backend(config.model, weights=config.weights, device=device,
                                      mc_dropout=config.method == "mc-dropout", **config.model_options)
    return _BACKENDS[key]


def _keep_console(backend, results_root: str, pair_id: str) -> None:
    """A model's console output for this pair (ANTs'), if it keeps one, into the run folder's pair log."""
    console = getattr(backend, "console", None)
    if console:
        from equiqc.storage.report import write_pair_log

        write_pair_log(Path(results_root).parent, pair_id, "\n".join(console))  # results_root: DIR/results.zarr


def ingest_task(spec: PairSpec, store: str, max_voxels: int | None) -> IngestOutcome:
    return ingest_pair(spec, store, max_voxels)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _from_json(d: dict) -> dict:
    return {k: (np.nan if v is None else v) for k, v in d.items()}


@dataclass(frozen=True)
class TaskConfig:
    """What the pair tasks need of the run, built once in the client (:meth:`of`) and sent to the workers as it is
    (a task neither rebuilds nor re-validates it): the run's configuration, its estimator settings, the key its
    results are stored under (:meth:`~equiqc.workflows.config.RunConfig.result_key`), and the voxel model of the
    calibration the run chose (its record, :mod:`equiqc.pipeline.voxel_error`; None: no ``error_mm``), which does
    not key the results."""

    run: RunConfig
    estimator: EstimatorConfig
    result_key: dict
    voxel_model: dict | None = None

    @classmethod
    def of(cls, run: RunConfig, voxel_model: dict | None = None) -> TaskConfig:
        return cls(run, run.estimator_config(), run.result_key(), voxel_model)


def base_row(outcome: IngestOutcome, subject_id: str, task: TaskConfig) -> dict:
    """The columns of a pair's report row that come from the run, not from its result."""
    config, est = task.run, task.estimator
    return {"subject_id": subject_id, "pair_id": outcome.pair_id, "model": config.model, "method": config.method,
            "perturbation": est.perturbation.kind, "seed": config.seed, "n_samples": est.samples * est.draws}


def summarise(result: UncertaintyResult, stored: dict, config: RunConfig, device: str = "cpu") -> dict:
    """The pair's report summaries (:func:`~equiqc.pipeline.scores.pair_summary`) over its target mask, per label of
    its target label map, against its ground truth when it has one; computed on ``device``."""
    src, tgt = stored["source"], stored["target"]
    pick = lambda role: stored[role].data if role in stored else None  # noqa: E731
    region = pick("target_mask")
    return pair_summary(result, src.affine, None if region is None else region > 0, pick("target_labels"),
                        pick("ground_truth"), source_shape=src.data.shape, source=src.data, target=tgt.data,
                        label_names={int(k): str(v) for k, v in config.label_names.items()},
                        target_affine=tgt.affine, device=device)


def pair_voxel_features(std_mm: np.ndarray, prediction_map: np.ndarray, stored: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(feature maps, region)`` of a pair (:func:`equiqc.pipeline.voxel_error.voxel_features`): the region is its
    target mask (else every voxel) where ``std_mm`` is finite, also the affine fit's region for the nonlinear part."""
    from equiqc.pipeline.voxel_error import voxel_features

    src, tgt = stored["source"], stored["target"]
    region = np.isfinite(std_mm)
    if "target_mask" in stored:
        region &= stored["target_mask"].data > 0
    return voxel_features(std_mm, prediction_map, src.data, tgt.data, src.affine, tgt.affine, region), region


def error_map(result: UncertaintyResult, stored: dict, model: dict) -> np.ndarray:
    """The pair's ``error_mm`` (target grid, mm; NaN where ``std_mm`` is) from a voxel model's record
    (:mod:`equiqc.pipeline.voxel_error`)."""
    from equiqc.pipeline.voxel_error import VoxelErrorModel

    maps, _ = pair_voxel_features(result.std_mm, result.prediction_map, stored)
    return np.where(np.isfinite(result.std_mm), VoxelErrorModel.from_dict(model).predict(maps),
                    np.nan).astype(np.float32)


def row_from_marker(outcome: IngestOutcome, subject_id: str, results_root: str, task: TaskConfig) -> dict | None:
    """The report row of a pair whose stored result is complete for this configuration, else None."""
    if R.status(results_root, outcome.pair_id, task.result_key, outcome.input_hash) != "complete":
        return None
    marker = R.read_marker(results_root, outcome.pair_id)
    return {**base_row(outcome, subject_id, task), **_from_json(marker["summary"]), "status": "complete",
            "runtime_s": marker["runtime_s"], "_computed": False}


@dataclass
class Estimated:
    """A pair estimated but not yet written (held in a GPU worker's memory between :func:`estimate_task` and
    :func:`write_task`); ``seconds``: the estimation's wall time; ``summary``: its summaries when the estimation
    task computed them (on the GPU), else None (the write task computes them)."""

    outcome: IngestOutcome
    subject_id: str
    result: UncertaintyResult
    stored: dict
    seconds: float
    summary: dict | None = None


def _failed(outcome: IngestOutcome, row: dict, results_root: str, key: dict) -> dict:
    """The failed row of the exception being handled; the failure is kept in the result store too, so `equiqc
    report` (of every shard) still gives the reason."""
    error, trace = f"{type(sys.exc_info()[1]).__name__}: {sys.exc_info()[1]}", traceback.format_exc()
    try:
        R.write_failure(results_root, outcome.pair_id, key, outcome.input_hash, error, trace)
    except Exception:  # the store itself is failing: the row below still carries the error
        pass
    return {**row, "status": "failed", "error": error, "_computed": True, "_traceback": trace}


def estimate_task(outcome: IngestOutcome, subject_id: str, cohort_store: str, results_root: str,
                  task: TaskConfig, write: bool = True, stored: dict | None = None) -> dict | Estimated:
    """Estimate one pair; with ``write``, also summarise and write it and return its report row, else return the
    :class:`Estimated` pair for :func:`write_task`. A pair that failed ingest, or whose result is already complete,
    is returned as its row at once. ``stored``: the pair's volumes when the caller has them (as
    :func:`~equiqc.storage.cohort.read_pair` gives them), else they are read from the cohort store. Never raises for
    a bad pair (its row says why)."""
    config = task.run
    row = base_row(outcome, subject_id, task)
    if outcome.status == "failed":
        return {**row, "status": "failed", "error": outcome.error, "_computed": False}
    done = row_from_marker(outcome, subject_id, results_root, task)
    if done is not None:
        return done
    try:
        start = time.perf_counter()
        stored = stored or read_pair(cohort_store, outcome.pair_id)
        src, tgt = stored["source"], stored["target"]
        backend = get_backend(config)
        given = stored["transform"].data if "transform" in stored else None  # a pipeline's own registration
        try:
            result = estimate_uncertainty(backend, src.data, tgt.data, src.affine, tgt.affine,
                                          task.estimator, seed=pair_seed(config.seed, outcome.pair_id),
                                          prediction=given)
        finally:
            _keep_console(backend, results_root, outcome.pair_id)
        # a GPU worker summarises on its device while it holds it (a few ms there, seconds of CPU at 1 mm); its
        # write task then only writes
        summary = None if write else summarise(result, stored, config, worker_device())
        estimated = Estimated(outcome, subject_id, result, stored, time.perf_counter() - start, summary)
    except Exception:  # one bad pair never stops the cohort: report it and carry on
        return _failed(outcome, row, results_root, task.result_key)
    return write_task(estimated, results_root, task) if write else estimated


def write_task(estimated: Estimated | dict, results_root: str, task: TaskConfig) -> dict:
    """Summarise an estimated pair and write its results (arrays, then the completion marker); returns its report
    row (a row passes through unchanged). Never raises for a bad pair."""
    if isinstance(estimated, dict):
        return estimated
    config, voxel_model = task.run, task.voxel_model
    outcome, stored, result = estimated.outcome, estimated.stored, estimated.result
    row = base_row(outcome, estimated.subject_id, task)
    try:
        start = time.perf_counter()
        summary = estimated.summary if estimated.summary is not None else summarise(result, stored, config)
        runtime = estimated.seconds + time.perf_counter() - start
        extra = {"summary": _json_safe(summary), "runtime_s": runtime, "version": equiqc.__version__,
                 "timings_s": result.timings_s, "source_affine": stored["source"].affine.tolist(),
                 **({"error_mm_model": voxel_model} if voxel_model else {})}
        arrays = {"error_mm": error_map(result, stored, voxel_model)} if voxel_model else None
        R.write_result(results_root, outcome.pair_id, result, stored["target"].affine, task.result_key,
                       outcome.input_hash, extra=extra, overwrite=config.overwrite, level=config.store, arrays=arrays)
        return {**row, **summary, "status": "complete", "runtime_s": runtime, "_computed": True}
    except Exception:
        return _failed(outcome, row, results_root, task.result_key)


def pairs_task(specs: list[PairSpec], cohort_store: str, results_root: str, task: TaskConfig) -> list[dict]:
    """:func:`pair_task` for each of ``specs``, one after another (CPU workers: one Dask task for a few small pairs,
    :func:`equiqc.workflows.run.pairs_per_task`); their report rows in the same order. Each pair is written as it
    finishes, so a task that dies part way loses nothing already computed."""
    return [pair_task(spec, cohort_store, results_root, task) for spec in specs]


def pair_task(spec: PairSpec, cohort_store: str, results_root: str, task: TaskConfig) -> dict:
    """Ingest, estimate and write one pair in one task (CPU workers), the volumes just ingested used as they are;
    returns its report row."""
    outcome, volumes = ingest_and_keep(spec, cohort_store, task.run.max_voxels)
    return estimate_task(outcome, spec.subject_id, cohort_store, results_root, task, stored=volumes)
