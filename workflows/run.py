"""A cohort run: manifest -> ingest tasks -> estimation tasks -> cohort scores -> report.

Output folder layout (``DIR``)::

    DIR/cohort.zarr      ingested pairs (storage.cohort)
    DIR/results.zarr     per-pair results with completion markers (storage.results)
    DIR/report.parquet   one row per manifest row; DIR/subjects.parquet worst pair per subject
    DIR/run.json         the manifest path and configuration of the run (``equiqc report`` reads it)
    DIR/.equiqc.lock     held while a run writes here

The graph is built with ``client.submit``: each pair's estimation task depends on its ingest task, so a
pair starts as soon as its own files are in Zarr. Estimation asks for the ``GPU`` resource on GPU clusters.
Tasks lost with a worker are retried (``retries``); a pair that raises becomes a failed row. Re-running
the same command skips pairs whose completion marker matches (resume).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import as_completed

from pipeline.scores import cohort_scores
from storage.manifest import PairSpec, read_manifest
from storage.report import write_report
from workflows.cluster import ClusterHandle, make_cluster
from workflows.config import ConfigError, RunConfig
from workflows.tasks import estimate_task, ingest_task


class RunLocked(RuntimeError):
    """Another run is writing to the same output folder."""


@dataclass
class RunSummary:
    rows: list[dict]
    report: Path
    seconds: float
    computed: int = 0
    dashboard: str | None = None
    html: Path | None = None

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "complete"]

    @property
    def flagged(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "complete" and r.get("flagged")]


class OutputLock:
    """An exclusive lock file in the output folder; a lock left by a dead process is taken over."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".equiqc.lock"

    def __enter__(self) -> OutputLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise RunLocked(f"{self.path.parent} is in use by another equiqc run (pid {pid}); wait for it "
                                    "to finish or use another --out folder") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
        raise RunLocked(f"could not lock {self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Progress:
    """One line per update on stderr: ``stage: done/total, elapsed, ETA``."""

    def __init__(self, stage: str, total: int, stream=sys.stderr):
        self.stage, self.total, self.done, self.start, self.stream = stage, total, 0, time.perf_counter(), stream

    def step(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{self.stage}: {self.done}/{self.total} pairs, {elapsed:.0f} s elapsed, ETA {eta:.0f} s",
              file=self.stream, flush=True)


def _html(out_dir: Path, config: RunConfig, seconds: float | None, log) -> Path | None:
    """Write report.html; a failure here is reported but never costs the Parquet report."""
    from workflows.html_report import write_html_report

    meta = {"model": config.model, "method": config.method, "perturbation": config.perturbation_config().kind,
            "K": config.samples, "seed": config.seed}
    if seconds is not None:
        meta["run time (s)"] = round(seconds, 1)
    try:
        return write_html_report(out_dir, threshold=config.z_threshold, meta=meta)
    except Exception as exc:
        log(f"equiqc: report.html could not be written ({type(exc).__name__}: {exc}); report.parquet is complete")
        return None


def check_previous_run(out_dir: Path, config: RunConfig) -> None:
    """Refuse to mix results of another configuration into ``out_dir`` unless overwriting."""
    previous = out_dir / "run.json"
    if not previous.exists() or config.overwrite:
        return
    old = json.loads(previous.read_text()).get("result_key")
    if old is not None and old != config.result_key():
        diff = [k for k in config.result_key() if old.get(k) != config.result_key()[k]]
        raise ConfigError(f"{out_dir} holds results of another configuration (differs in: {', '.join(diff)}); "
                          "use a new --out folder or add --overwrite to replace them")


def run_cohort(manifest: str | Path, out_dir: str | Path, config: RunConfig,
               handle: ClusterHandle | None = None, log=print) -> RunSummary:
    """Run (or resume) the whole cohort; returns the rows written to the report."""
    specs = read_manifest(manifest)  # ManifestError stops everything before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with OutputLock(out_dir):
        check_previous_run(out_dir, config)
        (out_dir / "run.json").write_text(json.dumps(
            {"manifest": str(Path(manifest).resolve()), "config": config.to_dict(),
             "result_key": config.result_key()}, indent=2))
        own = handle is None
        handle = handle or make_cluster(config)
        try:
            if handle.dashboard:
                log(f"Dask dashboard: {handle.dashboard}")
            rows = _execute(specs, out_dir, config, handle)
        finally:
            if own:
                handle.close()
        computed = sum(1 for r in rows if r.pop("_computed", False))
        rows = cohort_scores(rows, config.z_threshold, config.abs_threshold_mm, config.folding_threshold)
        report, _ = write_report(rows, out_dir)
        html_path = _html(out_dir, config, time.perf_counter() - start, log)
    return RunSummary(rows, report, time.perf_counter() - start, computed, handle.dashboard, html=html_path)


def _execute(specs: list[PairSpec], out_dir: Path, config: RunConfig, handle: ClusterHandle) -> list[dict]:
    client = handle.client
    store, results = str(out_dir / "cohort.zarr"), str(out_dir / "results.zarr")
    from storage.cohort import open_cohort
    from storage.results import open_results

    open_cohort(store)  # create the groups once, before workers write pairs into them
    open_results(results)
    resources = {"GPU": 1} if handle.gpu else None
    config_dict = config.to_dict()
    futures, ingests = {}, {}
    for spec in specs:
        ingest = client.submit(ingest_task, spec, store, config.max_voxels, key=f"ingest-{spec.pair_id}",
                               retries=config.retries, pure=False)
        ingests[ingest] = spec
        futures[client.submit(estimate_task, ingest, spec.subject_id, store, results, config_dict,
                              key=f"estimate-{spec.pair_id}", resources=resources, retries=config.retries,
                              pure=False)] = spec
    progress = {"ingest": Progress("ingest", len(specs)), "estimate": Progress("estimate", len(specs))}
    rows: dict[str, dict] = {}
    for future in as_completed(list(ingests) + list(futures)):
        if future in ingests:
            progress["ingest"].step()
            continue
        spec = futures[future]
        try:
            row = future.result()
        except Exception as exc:  # the task itself died (e.g. its worker kept crashing past the retries)
            row = {"subject_id": spec.subject_id, "pair_id": spec.pair_id, "status": "failed",
                   "error": f"{type(exc).__name__}: {exc}", "_computed": True}
        rows[spec.pair_id] = row
        progress["estimate"].step()
    return [rows[s.pair_id] for s in specs]  # manifest order


def rebuild_report(out_dir: str | Path) -> RunSummary:
    """Rebuild ``report.parquet`` from the stored results and ingest records of a run folder (no compute)."""
    from storage.cohort import IngestOutcome, pair_status
    from workflows.tasks import base_row, row_from_marker

    out_dir = Path(out_dir)
    run = out_dir / "run.json"
    if not run.exists():
        raise ConfigError(f"{out_dir} has no run.json; it is not an equiqc run folder (run `equiqc run` first)")
    info = json.loads(run.read_text())
    config = RunConfig(**info["config"])
    start = time.perf_counter()
    rows = []
    for spec in read_manifest(info["manifest"]):
        attrs = pair_status(out_dir / "cohort.zarr", spec.pair_id)
        outcome = IngestOutcome(spec.pair_id, "failed" if attrs.get("status") == "failed" else "ingested",
                                attrs.get("error"), attrs.get("input_hash"))
        row = None
        if attrs.get("status") == "ok":
            row = row_from_marker(outcome, spec.subject_id, str(out_dir / "results.zarr"), config)
        if row is None:
            error = attrs.get("error") if attrs.get("status") == "failed" else (
                "no complete result; run `equiqc run` again to compute it")
            row = {**base_row(outcome, spec.subject_id, config), "status": "failed", "error": error}
        row.pop("_computed", None)
        rows.append(row)
    rows = cohort_scores(rows, config.z_threshold, config.abs_threshold_mm, config.folding_threshold)
    report, _ = write_report(rows, out_dir)
    return RunSummary(rows, report, time.perf_counter() - start, html=_html(out_dir, config, None, print))
