"""A cohort run: manifest -> ingest tasks -> estimation tasks -> cohort scores -> report.

Output folder layout (``DIR``)::

    DIR/cohort.zarr      ingested pairs (storage.cohort)
    DIR/results.zarr     per-pair results with completion markers (storage.results)
    DIR/report.parquet   one row per manifest row; DIR/subjects.parquet worst pair per subject
    DIR/decisions.tsv    the decision per pair; DIR/exclude.tsv the pairs to drop; DIR/ratings.tsv people's
                         ratings (storage.decisions)
    DIR/run.json         the manifest path, configuration, result key, provenance and calibration of the run
                         (``equiqc report`` reads it; provenance: see equiqc.workflows.provenance; calibration:
                         equiqc.workflows.calibrate)
    DIR/.equiqc-locks/   the leases of the runs writing here (storage.locks)

The graph is built with ``client.submit``: on CPU workers one task per pair, or per few pairs in a large cohort
(:func:`pairs_per_task`); on GPU workers an ingest, an estimation (asking for the ``GPU`` resource) and a write
task per pair, so that loading and writing overlap the GPU's work (:mod:`equiqc.workflows.tasks`). Tasks lost
with a worker are retried (``retries``), then a task of several pairs is split into one task per pair; a pair
that raises becomes a failed row. Re-running
the same command skips pairs whose completion marker matches (resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from distributed import as_completed

from equiqc.pipeline.calibration import apply_calibration
from equiqc.pipeline.decision import decide
from equiqc.pipeline.voxel_error import VoxelErrorModel
from equiqc.storage import run_folder as RF
from equiqc.storage.locks import Lease, participant_scope, shard_scope
from equiqc.storage.manifest import PairSpec, read_manifest
from equiqc.storage.report import write_report
from equiqc.storage.results import LEVEL_KEY, RECOMPUTE_KEYS, differing_keys
from equiqc.workflows.calibration_choice import CalibrationChoice, choose_calibration
from equiqc.workflows.cluster import GPU_RESOURCE, ClusterHandle, make_cluster
from equiqc.workflows.config import ConfigError, RunConfig, config_from_record
from equiqc.workflows.logs import LOGGER, log_to_folder, progress_bar
from equiqc.workflows.provenance import device_description, environment, now_utc, probe_model
from equiqc.workflows.tasks import (
    TaskConfig,
    base_row,
    estimate_task,
    ingest_task,
    pairs_task,
    row_from_marker,
    write_task,
)


@dataclass
class RunSummary:
    rows: list[dict]
    report: Path | None  # None for a shard: `equiqc report DIR` merges every shard once all have run
    seconds: float
    computed: int = 0
    dashboard: str | None = None
    html: Path | None = None
    shard: tuple[int, int] | None = None
    partial: bool = False  # a shard or a subset of subjects: results written, no report (equiqc report merges)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "complete"]

    @property
    def flagged(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "complete" and r.get("flagged")]


def _html(out_dir: Path, config: RunConfig, provenance: dict, calibration: CalibrationChoice, log,
          draw=None) -> Path | None:
    """Write report.html (its figures drawn by ``draw``, default in this process); a failure here is reported but
    never costs the Parquet report."""
    from equiqc.workflows.html_report import draw_in_process, write_html_report

    meta = {"model": config.model, "method": config.method, "perturbation": config.perturbation_config().kind,
            "K": config.samples, "seed": config.seed, "calibration": calibration.summary}
    meta.update(provenance_summary(provenance))
    try:
        return write_html_report(out_dir, meta=meta, draw=draw or draw_in_process)
    except Exception as exc:
        log(f"equiqc: report.html could not be written ({type(exc).__name__}: {exc}); report.parquet is complete")
        return None


def provenance_summary(provenance: dict) -> dict:
    """The provenance fields shown in report.html's header, as short strings."""
    model = provenance.get("model") or {}
    sha = model.get("weights_sha256")
    return {"equiqc": f"{provenance.get('equiqc_version')} ({provenance.get('equiqc_commit') or 'commit unknown'})",
            "torch": f"{provenance.get('torch')} (CUDA {provenance.get('cuda') or 'none'})",
            "devices": ", ".join(provenance.get("devices") or []) or "unknown",
            "host": provenance.get("host"), "started": provenance.get("started"),
            "finished": provenance.get("finished"), "command": provenance.get("command_line"),
            "weights": f"{model.get('weights_path') or 'none'} (sha256 {sha[:16] + '...' if sha else 'n/a'})"}


def check_previous_run(out_dir: Path, config: RunConfig, log=LOGGER.info) -> None:
    """Refuse to mix results of another configuration into ``out_dir`` unless overwriting. A previous run of the
    same configuration whose weights file or numerics changed is not refused: its pairs are stale and are
    recomputed (said in the log)."""
    if not RF.has_run_record(out_dir) or config.overwrite:
        return
    old = RF.read_run_record(out_dir).get("result_key")
    if old is None:
        return
    diff = differing_keys(old, config.result_key()) - {LEVEL_KEY}  # another level: decided pair by pair
    if diff - RECOMPUTE_KEYS:
        raise ConfigError(f"{out_dir} holds results of another configuration (differs in: "
                          f"{', '.join(sorted(diff - RECOMPUTE_KEYS))}); use a new --out folder or add --overwrite "
                          "to replace them")
    if diff:
        log(f"equiqc: {out_dir} was computed with other {' and '.join(sorted(diff))}; every pair is recomputed")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (1 <= I <= N) -> ``(I, N)``; ``None`` stays ``None``. ConfigError for anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. --shard 3/10 "
                          "(SLURM: --shard $((SLURM_ARRAY_TASK_ID))/N)")
    return int(match.group(1)), int(match.group(2))


def shard_of(pair_id: str, n: int) -> int:
    """The shard (1..n) a pair belongs to: a hash of its id, so a pair's shard does not depend on the manifest's
    order or on other rows (adding pairs never moves existing ones between shards)."""
    return int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "little") % n + 1


def select_shard(specs: list[PairSpec], shard: tuple[int, int] | None) -> list[PairSpec]:
    if shard is None:
        return specs
    return [s for s in specs if shard_of(s.pair_id, shard[1]) == shard[0]]


def _prepare(manifest: str | Path, config: RunConfig, shard: tuple[int, int] | None,
             subjects: set[str] | None = None):
    """Everything checked before any work: the manifest, the shard, the model (loaded once here), the
    calibration (a given file must match the run's setting)."""
    specs = select_shard(read_manifest(manifest), shard)  # ManifestError stops everything before any work
    if subjects is not None:
        specs = [s for s in specs if s.subject_id in subjects]
    model = probe_model(config)  # ConfigError stops everything before any work
    config = dataclasses.replace(config, weights_sha256=model.weights_sha256)
    return specs, model, config, choose_calibration(config)


def run_cohort(manifest: str | Path, out_dir: str | Path, config: RunConfig, handle: ClusterHandle | None = None,
               log=LOGGER.info, argv: list[str] | None = None, shard: tuple[int, int] | None = None,
               subjects: set[str] | None = None) -> RunSummary:
    """Run (or resume) the whole cohort, or shard ``(I, N)`` of it, or the pairs of ``subjects`` (subject ids,
    a BIDS participant-level run); returns the rows computed or found.

    Before any work: the manifest is read and checked, and the model is loaded once here (ConfigError for an
    unknown model, missing weights, a bad model option or ``draws > 1`` on a deterministic model). A shard (or
    a subset of subjects) writes its pairs' results and no report: ``equiqc report DIR`` merges every shard's
    results into one."""
    specs, model, config, calibration = _prepare(manifest, config, shard, subjects)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    scopes = [shard_scope(shard)] if subjects is None else [participant_scope(s) for s in sorted(subjects)]
    with contextlib.ExitStack() as leases, log_to_folder(out_dir):
        for scope in scopes:
            leases.enter_context(Lease(out_dir, scope))
        LOGGER.debug(f"run of {len(specs)} pairs from {manifest} into {out_dir}; model {model}")
        check_previous_run(out_dir, config, log)
        started = now_utc()
        own = handle is None
        LOGGER.debug("phase: start")
        handle = handle or make_cluster(config)
        LOGGER.debug("phase: cluster ready")
        try:
            provenance = environment(model, list(handle.client.run(device_description).values()), started, argv)
            record = {"manifest": str(Path(manifest).resolve()), "config": config.to_dict(),
                      "result_key": config.result_key(), "provenance": provenance,
                      "calibration": calibration.to_record()}
            RF.write_run_record(out_dir, record)
            if handle.dashboard:
                log(f"Dask dashboard: {handle.dashboard}")
            rows = _execute(specs, out_dir, config, handle, calibration.voxel_model)
            LOGGER.debug("phase: estimation done")
            _crash_files(rows, out_dir)
            computed = sum(1 for r in rows if r.pop("_computed", False))
            partial = shard is not None or subjects is not None
            provenance["finished"] = now_utc()
            RF.write_run_record(out_dir, record)
            report = html_path = None
            if not partial:  # the whole cohort: decide, and draw the report's figures on the cluster's workers
                report, html_path = _finish(rows, specs, out_dir, config, provenance, calibration, log,
                                            draw=cluster_drawing(handle))
                LOGGER.debug("phase: report.html written")
        finally:
            if own:
                handle.close()
        LOGGER.debug("phase: cluster closed")
    seconds = time.perf_counter() - start
    if partial:
        return RunSummary(rows, None, seconds, computed, handle.dashboard, shard=shard, partial=True)
    return RunSummary(rows, report, seconds, computed, handle.dashboard, html=html_path)


def cluster_drawing(handle: ClusterHandle):
    """A ``draw`` for :func:`~equiqc.workflows.html_report.write_html_report`: one task per figure on the cluster's
    workers (no GPU resource asked: figures need only the CPU and the stores)."""
    from equiqc.workflows.pair_figures import draw_pair_figure

    def draw(out_dir: Path, pair_ids: list[str]) -> dict[str, str | None]:
        if not pair_ids:
            return {}
        futures = handle.client.map(draw_pair_figure, [str(out_dir)] * len(pair_ids), pair_ids,
                                    key=[f"figure-{pid}" for pid in pair_ids], pure=False)
        return dict(zip(pair_ids, handle.client.gather(futures), strict=True))

    return draw


def _crash_files(rows: list[dict], out_dir: Path) -> None:
    """A crash file per failed pair (error and traceback), linked from its row as ``crash_file``."""
    from equiqc.storage.report import write_crash_file

    for r in rows:
        trace = r.pop("_traceback", None)
        if r.get("status") != "complete":
            r["crash_file"] = write_crash_file(out_dir, r["pair_id"], str(r.get("error")), trace)


def _finish(rows: list[dict], specs: list[PairSpec], out_dir: Path, config: RunConfig, provenance: dict,
            calibration: CalibrationChoice, log, draw=None) -> tuple[Path, Path | None]:
    """The decision (expected errors, reasons, risk, people's ratings) and every report file of a whole cohort
    (report.html's figures drawn by ``draw``: see :func:`_html`)."""
    from equiqc.storage.decisions import decision_table, session_of, stored_ratings, write_decisions

    apply_calibration(rows, calibration.calibration)
    decide(rows, config.decision_rules())
    ratings = stored_ratings(out_dir)
    sessions = {s.pair_id: session_of(s.pair_id, s.source.name) for s in specs}
    table = decision_table(rows, ratings, sessions)
    for row, rating in zip(rows, table["rating"], strict=True):
        row["rating"] = rating or None
    report, _ = write_report(rows, out_dir, metadata={"provenance": provenance, "config": config.to_dict(),
                                                      "calibration": calibration.to_record()})
    write_decisions(table, out_dir)
    LOGGER.debug("phase: report.parquet and decisions written")
    return report, _html(out_dir, config, provenance, calibration, log, draw)


def plan_run(manifest: str | Path, out_dir: str | Path, config: RunConfig,
             shard: tuple[int, int] | None = None) -> str:
    """What ``equiqc run`` would do, as text: pairs to compute and already complete, the cluster and (jobqueue)
    its rendered job script. Reads the inputs (to hash them) and the stores; starts no worker and no job."""
    from equiqc.storage import results as R
    from equiqc.storage.cohort import input_hashes, pair_status
    from equiqc.workflows.cluster import cluster_kwargs, job_script, uses_gpu

    specs, model, config, calibration = _prepare(manifest, config, shard)
    out_dir = Path(out_dir)
    key, complete, unreadable = config.result_key(), [], []
    for spec in specs:
        try:
            _, input_hash = input_hashes(spec)
        except OSError:
            unreadable.append(spec.pair_id)
            continue
        stored = pair_status(RF.cohort_store(out_dir), spec.pair_id) if RF.cohort_store(out_dir).exists() else {}
        if stored.get("input_hash") == input_hash and R.status(RF.results_store(out_dir), spec.pair_id, key,
                                                                input_hash) == "complete":
            complete.append(spec.pair_id)
    todo = len(specs) - len(complete)
    lines = [f"manifest: {Path(manifest).resolve()}" + (f" (shard {shard[0]}/{shard[1]})" if shard else ""),
             f"output: {out_dir.resolve()}",
             f"model: {model.name} (weights {model.weights_path or 'none'}, sha256 {model.weights_sha256 or 'n/a'})",
             f"pairs: {len(specs)}: {todo} to compute, {len(complete)} already complete"
             + (f", {len(unreadable)} with unreadable input files" if unreadable else ""),
             f"calibration: {calibration.summary}"]
    if config.scheduler:
        lines.append(f"cluster: the existing scheduler {config.scheduler}"
                     + (" (tasks ask for GPU=1: its workers must advertise it)" if uses_gpu(config) else ""))
    else:
        kind, kwargs = cluster_kwargs(config)
        jobs = f", {config.workers or 1} job(s)" if kind in ("slurm", "pbs") else ""
        lines.append(f"cluster: {kind}{jobs}, GPU tasks: {'yes' if uses_gpu(config) else 'no'}, options {kwargs}")
        script = job_script(config)
        if script:
            lines += ["job script (one per job; not submitted):", script]
    return "\n".join(lines)


def _execute(specs: list[PairSpec], out_dir: Path, config: RunConfig, handle: ClusterHandle,
             voxel_model: VoxelErrorModel | None = None) -> list[dict]:
    """Compute every pair on the cluster (see :mod:`equiqc.workflows.tasks` for the graph's shape); with a
    ``voxel_model`` (the run's calibration's), each pair's ``error_mm`` is stored beside its ``std_mm``."""
    client = handle.client
    store, results = str(RF.cohort_store(out_dir)), str(RF.results_store(out_dir))
    from equiqc.storage.cohort import open_cohort
    from equiqc.storage.results import open_results

    open_cohort(store)  # create the groups once, before workers write pairs into them
    open_results(results)
    task = TaskConfig.of(config, voxel_model.to_dict() if voxel_model else None)
    futures: dict = {}  # future -> the specs whose rows it returns
    if handle.gpu:
        for spec in specs:  # the graph's shape: see equiqc.workflows.tasks
            pid = spec.pair_id
            ingest = client.submit(ingest_task, spec, store, config.max_voxels, key=f"ingest-{pid}",
                                   retries=config.retries, pure=False)
            estimate = client.submit(estimate_task, ingest, spec.subject_id, store, results, task, write=False,
                                     key=f"estimate-{pid}", resources=dict(GPU_RESOURCE), retries=config.retries,
                                     pure=False)
            futures[client.submit(write_task, estimate, results, task, key=f"write-{pid}", priority=1,
                                  retries=config.retries, pure=False)] = [spec]
    else:
        size = pairs_per_task(len(specs), expected_workers(handle))
        for start in range(0, len(specs), size):
            batch = specs[start:start + size]
            key = f"pair-{batch[0].pair_id}" + (f"+{len(batch) - 1}" if len(batch) > 1 else "")
            futures[client.submit(pairs_task, batch, store, results, task, key=key, retries=config.retries,
                                  pure=False)] = batch
    rows: dict[str, dict] = {}
    # results come with their futures, every finished one at once: a result() call per future cost the client a
    # round trip through its event loop each (1.5-2.5 ms per task on 2 cores, /tmp benchmark of 2,100 tasks)
    finished = as_completed(list(futures), with_results=True, raise_errors=False)
    with progress_bar(len(specs), "pairs") as bar:
        for ready in finished.batches():
            for future, outcome in ready:
                done = futures.pop(future)
                if future.status != "finished" and len(done) > 1:
                    # a task of several pairs died (past its retries): each of them again on its own, so a pair
                    # that kills its worker costs only itself (pairs already written come back from their markers)
                    for spec in done:
                        retry = client.submit(pairs_task, [spec], store, results, task,
                                              key=f"pair-{spec.pair_id}-alone", retries=config.retries, pure=False)
                        futures[retry] = [spec]
                        finished.add(retry)
                    continue
                got = [_died(done[0], outcome)] if future.status != "finished" else (
                    outcome if isinstance(outcome, list) else [outcome])
                for spec, row in zip(done, got, strict=True):
                    rows[spec.pair_id] = row
                    if row["status"] == "failed":
                        LOGGER.warning(f"{spec.pair_id}: failed ({row.get('error')})")
                    else:
                        LOGGER.debug(f"{spec.pair_id}: {row['status']} in {row.get('runtime_s', 0):.1f} s")
                bar.update(len(got))
    return [rows[s.pair_id] for s in specs]  # manifest order


MAX_PAIRS_PER_TASK = 8
TASKS_PER_WORKER = 16


def pairs_per_task(pairs: int, workers: int) -> int:
    """How many pairs one task runs on CPU workers: up to :data:`MAX_PAIRS_PER_TASK`, as long as every worker still
    gets :data:`TASKS_PER_WORKER` tasks or more (so the last tasks end close together). One per pair for small
    cohorts; Dask's own cost per task (several ms of CPU in the client and the worker) is then spread over
    several pairs."""
    return max(1, min(MAX_PAIRS_PER_TASK, pairs // (TASKS_PER_WORKER * max(workers, 1))))


def expected_workers(handle: ClusterHandle) -> int:
    """The workers the run will have: those connected now, or the cluster's plan when more are coming (a SLURM/PBS
    cluster's jobs, each maybe several worker processes, may still wait in the queue when the tasks are made)."""
    planned = len(getattr(handle.cluster, "plan", ()) or ())
    return max(1, planned, len(handle.client.scheduler_info()["workers"]))


def _died(spec: PairSpec, outcome) -> dict:
    """The failed row of a pair whose task itself died (e.g. its worker kept crashing past the retries):
    ``outcome`` is the future's ``(type, exception, traceback)``, or the exception it was cancelled with."""
    exc = outcome[1].with_traceback(outcome[2]) if isinstance(outcome, tuple) else outcome
    return {"subject_id": spec.subject_id, "pair_id": spec.pair_id, "status": "failed",
            "error": f"{type(exc).__name__}: {exc}", "_computed": True,
            "_traceback": "".join(traceback.format_exception(exc))}


def rebuild_report(out_dir: str | Path, tolerance_mm: float | None = None,
                   ratings: str | Path | None = None) -> RunSummary:
    """See :func:`_rebuild_report`; logs into the run folder's equiqc.log."""
    if not RF.has_run_record(out_dir):
        return _rebuild_report(out_dir, tolerance_mm, ratings)  # raises the error that explains
    with log_to_folder(out_dir):
        return _rebuild_report(out_dir, tolerance_mm, ratings)


def _rebuild_report(out_dir: str | Path, tolerance_mm: float | None = None,
                    ratings: str | Path | None = None) -> RunSummary:
    """Rebuild the report and decision files of a run folder from its stored results (no compute).

    This is also how the shards of a job array are merged: every shard writes into the same stores.
    ``tolerance_mm`` re-thresholds the decision (kept in run.json for later rebuilds; a resumed ``equiqc run``
    uses its own options);
    ``ratings`` (a TSV) is merged into the folder's ``ratings.tsv``, where every rating stays."""
    from equiqc.storage import results as R
    from equiqc.storage.cohort import IngestOutcome, pair_status

    out_dir = Path(out_dir)
    info = RF.read_run_record(out_dir)
    config = config_from_record(info["config"])
    specs = read_manifest(info["manifest"])
    if tolerance_mm is not None:
        config = dataclasses.replace(config, tolerance_mm=tolerance_mm)  # validated like every option
        info["config"] = config.to_dict()
        RF.write_run_record(out_dir, info)
    if ratings is not None:
        from equiqc.storage.decisions import merge_ratings, read_ratings

        merge_ratings(out_dir, read_ratings(ratings, {s.pair_id for s in specs}))
    provenance = {**info.get("provenance", {}), "report_rebuilt": now_utc()}
    start = time.perf_counter()
    task, rows = TaskConfig.of(config), []
    for spec in specs:
        attrs = pair_status(RF.cohort_store(out_dir), spec.pair_id)
        outcome = IngestOutcome(spec.pair_id, "failed" if attrs.get("status") == "failed" else "ingested",
                                attrs.get("error"), attrs.get("input_hash"))
        row, failure = None, None
        if attrs.get("status") == "ok":
            row = row_from_marker(outcome, spec.subject_id, str(RF.results_store(out_dir)), task)
            failure = R.read_failure(RF.results_store(out_dir), spec.pair_id, task.result_key, outcome.input_hash)
        if row is None:
            error = attrs.get("error") if attrs.get("status") == "failed" else failure["error"] if failure else (
                "no complete result; run `equiqc run` again to compute it")
            row = {**base_row(outcome, spec.subject_id, task), "status": "failed", "error": error,
                   "_traceback": failure.get("traceback") if failure else None}
        row.pop("_computed", None)
        rows.append(row)
    _crash_files(rows, out_dir)
    # the mapping the run used (kept in run.json); a folder from before calibrations gets today's choice
    calibration = (CalibrationChoice.from_record(info["calibration"]) if info.get("calibration")
                   else choose_calibration(config))
    report, html_path = _finish(rows, specs, out_dir, config, provenance, calibration, LOGGER.info)
    return RunSummary(rows, report, time.perf_counter() - start, html=html_path)
