"""What runs on the workers: ingest one pair, estimate one pair. Only paths and small rows travel.

The model is loaded once per worker process (``_BACKENDS``), on that worker's device (the GPU dask-cuda
pinned it to, else the CPU), and reused by every estimation task the worker runs.
"""

from __future__ import annotations

import math
import time
import traceback

import numpy as np
import torch

import equiqc
from equiqc.pipeline.backends.registry import load_backend
from equiqc.pipeline.estimator import estimate_uncertainty
from equiqc.pipeline.perturbations import pair_seed
from equiqc.pipeline.scores import pair_summary
from equiqc.storage import results as R
from equiqc.storage.cohort import IngestOutcome, ingest_pair, read_pair
from equiqc.storage.manifest import PairSpec
from equiqc.workflows.config import RunConfig, config_from_record

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


def ingest_task(spec: PairSpec, store: str, max_voxels: int | None) -> IngestOutcome:
    return ingest_pair(spec, store, max_voxels)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _from_json(d: dict) -> dict:
    return {k: (np.nan if v is None else v) for k, v in d.items()}


def base_row(outcome: IngestOutcome, subject_id: str, config: RunConfig) -> dict:
    est = config.estimator_config()
    n = est.samples * est.draws
    return {"subject_id": subject_id, "pair_id": outcome.pair_id, "model": config.model, "method": config.method,
            "perturbation": est.perturbation.kind, "seed": config.seed, "n_samples": n}


def label_masks(stored, config: RunConfig) -> dict[str, np.ndarray]:
    if "target_labels" not in stored:
        return {}
    labels = stored["target_labels"].data
    names = {int(k): str(v) for k, v in config.label_names.items()}
    return {names.get(int(v), f"label{int(v)}"): labels == v for v in np.unique(labels) if v != 0}


def row_from_marker(outcome: IngestOutcome, subject_id: str, results_root: str, config: RunConfig) -> dict | None:
    """The report row of a pair whose stored result is complete for this configuration, else None."""
    if R.status(results_root, outcome.pair_id, config.result_key(), outcome.input_hash) != "complete":
        return None
    marker = R.read_marker(results_root, outcome.pair_id)
    return {**base_row(outcome, subject_id, config), **_from_json(marker["summary"]), "status": "complete",
            "runtime_s": marker["runtime_s"], "_computed": False}


def estimate_task(outcome: IngestOutcome, subject_id: str, cohort_store: str, results_root: str,
                  config_dict: dict) -> dict:
    """Estimate one pair and write its results; returns its report row. Never raises for a bad pair."""
    config = config_from_record(config_dict)
    row = base_row(outcome, subject_id, config)
    if outcome.status == "failed":
        return {**row, "status": "failed", "error": outcome.error, "_computed": False}
    key = config.result_key()
    done = row_from_marker(outcome, subject_id, results_root, config)
    if done is not None:
        return done
    try:
        start = time.perf_counter()
        stored = read_pair(cohort_store, outcome.pair_id)
        src, tgt = stored["source"], stored["target"]
        result = estimate_uncertainty(get_backend(config), src.data, tgt.data, src.affine, tgt.affine,
                                      config.estimator_config(), seed=pair_seed(config.seed, outcome.pair_id))
        region = stored["target_mask"].data > 0 if "target_mask" in stored else None
        truth = stored["ground_truth"].data if "ground_truth" in stored else None
        summary = pair_summary(result, src.affine, region, label_masks(stored, config), truth,
                               source_shape=src.data.shape, source=src.data, target=tgt.data)
        runtime = time.perf_counter() - start
        R.write_result(results_root, outcome.pair_id, result, tgt.affine, key, outcome.input_hash,
                       extra={"summary": _json_safe(summary), "runtime_s": runtime, "version": equiqc.__version__,
                              "timings_s": result.timings_s, "source_affine": src.affine.tolist()},
                       overwrite=config.overwrite, level=config.store)
        return {**row, **summary, "status": "complete", "runtime_s": runtime, "_computed": True}
    except Exception as exc:  # one bad pair never stops the cohort: report it and carry on
        error, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        try:  # kept in the result store, so `equiqc report` (of every shard) still gives the reason
            R.write_failure(results_root, outcome.pair_id, key, outcome.input_hash, error, trace)
        except Exception:  # the store itself is failing: the row below still carries the error
            pass
        return {**row, "status": "failed", "error": error, "_computed": True, "_traceback": trace}
