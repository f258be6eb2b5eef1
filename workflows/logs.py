"""Logging and progress for runs that last hours in a batch job.

One logger, ``equiqc``: the console (stderr) shows INFO (``-q``: warnings only, ``-v``: DEBUG); every run
also appends everything (DEBUG, with timestamps and the process) to its folder's ``equiqc.log``. Progress is
one tqdm bar per run: refreshed every second on a terminal, every 60 s when stderr is a file (a batch job's
output then holds one carriage-return-separated line per minute, not a line per pair), hidden by ``-q``.
Each failed pair gets a crash file, ``DIR/crash/<pair_id>.txt``, with its error and full traceback
(:func:`equiqc.workflows.run` writes them; the report rows link them).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

LOGGER = logging.getLogger("equiqc")
LOG_FILE = "equiqc.log"
_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected batch log)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_console(verbosity: int = 0) -> None:
    """Console logging for the CLI: ``verbosity`` -1 (``-q``), 0 or 1 (``-v``)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    LOGGER.setLevel(logging.DEBUG)
    for handler in [h for h in LOGGER.handlers if getattr(h, "_equiqc_console", False)]:
        LOGGER.removeHandler(handler)
    handler = _Stderr()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._equiqc_console = True
    LOGGER.addHandler(handler)


@contextlib.contextmanager
def log_to_folder(out_dir: str | Path) -> Iterator[Path]:
    """Append everything logged meanwhile to ``out_dir/equiqc.log``."""
    path = Path(out_dir) / LOG_FILE
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    previous = LOGGER.level
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.addHandler(handler)
    try:
        yield path
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
        LOGGER.setLevel(previous)


def quiet() -> bool:
    consoles = [h for h in LOGGER.handlers if getattr(h, "_equiqc_console", False)]
    return bool(consoles) and all(h.level > logging.INFO for h in consoles)


def progress_bar(total: int, desc: str) -> tqdm:
    """One rate-limited bar on stderr (see module docstring)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="pair", file=sys.stderr, mininterval=1.0 if tty else 60.0,
                maxinterval=1e9 if not tty else 10.0, dynamic_ncols=tty, disable=quiet() or total == 0,
                ascii=not tty)
