"""Run leases on an output folder that hold on shared filesystems (NFS, Lustre, GPFS), across hosts.

A run holds a *lease*: a file ``DIR/.equiqc-locks/<scope>.lock`` created atomically (``O_CREAT | O_EXCL``,
atomic on NFSv3+ and on parallel filesystems) holding JSON ``{host, pid, scope, started, heartbeat, token}``.
A daemon thread rewrites the heartbeat every ``heartbeat_s`` seconds (atomic replace). A lease is *stale*,
and may be taken over, only when

* it was written on this host and its process is gone, or
* its heartbeat is older than ``timeout_s`` (its holder, on whichever host, stopped renewing it).

A lease held by a live run on another host is never taken over: the error names that host and pid.

Scopes: an unsharded run takes ``all``; a shard ``I/N`` of a job array takes ``shard-I-of-N``; a BIDS
participant-level run takes ``participant-<label>`` for each participant it computes. Two leases conflict
when either is ``all``, when they are the same scope, when they split the cohort differently (other N), or
when one is a participant and the other a shard: shards of one split run side by side on one folder, so do
different participants; anything else waits.

Why not ``filelock``: its ``FileLock`` relies on ``fcntl``/``flock``, which NFS and Lustre honour only with
particular mount options, and its ``SoftFileLock`` has no way to tell a live holder on another host from a
crashed one. Creating a file with O_EXCL is the primitive both build on; the lease and heartbeat on top are
what no maintained library offers for this case.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from equiqc.errors import UserError

LOCK_DIR = ".equiqc-locks"


class RunLocked(UserError, RuntimeError):
    """Another run holds a conflicting lease on the same output folder."""


def shard_scope(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def participant_scope(label: str) -> str:
    """The scope of a BIDS participant-level run for one participant (``equiqc bids ... participant``)."""
    return f"participant-{label}"


def _conflict(a: str, b: str) -> bool:
    if "all" in (a, b) or a == b:
        return True
    pa, pb = a.startswith("participant-"), b.startswith("participant-")
    if pa or pb:
        return not (pa and pb)  # participants run side by side; a participant and a shard may share pairs
    na, nb = re.fullmatch(r"shard-\d+-of-(\d+)", a), re.fullmatch(r"shard-\d+-of-(\d+)", b)
    return not (na and nb and na.group(1) == nb.group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Context manager holding the lease ``scope`` on ``out_dir`` (see module docstring)."""

    def __init__(self, out_dir: str | Path, scope: str = "all", heartbeat_s: float = 30.0, timeout_s: float = 600.0,
                 host: str | None = None):
        self.dir = Path(out_dir) / LOCK_DIR
        self.scope, self.heartbeat_s, self.timeout_s = scope, heartbeat_s, timeout_s
        self.host = host or socket.gethostname()
        self.path = self.dir / f"{scope}.lock"
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record
    def _record(self) -> dict:
        return {"host": self.host, "pid": os.getpid(), "scope": self.scope, "token": self.token,
                "started": self._started, "heartbeat": time.time()}

    @staticmethod
    def read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def is_stale(self, record: dict | None, path: Path) -> bool:
        if record is None:  # unreadable or half-written: stale only once it is old
            try:
                return time.time() - path.stat().st_mtime > self.timeout_s
            except FileNotFoundError:
                return True
        if record.get("host") == self.host and not _alive(int(record.get("pid", 0))):
            return True
        return time.time() - float(record.get("heartbeat", 0)) > self.timeout_s

    # -- acquire / release
    def __enter__(self) -> Lease:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(self.path)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._record(), fh)
            break
        else:
            raise RunLocked(f"could not take the lease {self.path}; try again")
        try:
            for other in self.dir.glob("*.lock"):
                if other != self.path and _conflict(self.scope, other.stem):
                    self._take_over_or_refuse(other)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._beat, name="equiqc-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over_or_refuse(self, path: Path) -> None:
        record = self.read(path)
        if not self.is_stale(record, path):
            who = f"host {record.get('host')}, pid {record.get('pid')}" if record else "an unknown run"
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0))) if record else "?"
            scope = record.get("scope") if record else "?"
            raise RunLocked(f"{path.parent.parent} is in use by another equiqc run ({who}, {scope}, since {since}); "
                            "wait for it to finish or use another --out folder. If that run is gone, its lease "
                            f"expires {self.timeout_s:.0f} s after its last heartbeat")
        # Stale: move it aside atomically (only one taker's rename succeeds), check it is the one judged stale.
        aside = path.with_name(f"{path.name}.stale-{self.token}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # another run took it over (or it was released) first
        moved = self.read(aside)
        if record is not None and moved is not None and moved.get("token") != record.get("token"):
            os.rename(aside, path)  # a fresh lease replaced the stale one meanwhile: put it back, look again
            self._take_over_or_refuse(path)
            return
        aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self.read(self.path)
            if current is not None and current.get("token") != self.token:
                return  # this run was judged gone and its lease taken over: never overwrite the new holder's
            tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
            try:
                tmp.write_text(json.dumps(self._record()))
                os.replace(tmp, self.path)
            except OSError:
                pass  # a transient filesystem error: the next beat tries again

    def _release(self) -> None:
        record = self.read(self.path)
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._release()
