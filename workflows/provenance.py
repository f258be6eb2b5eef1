"""What made an output: the run's environment, the model and its weights, checked before any pair runs.

:func:`probe_model` loads the model once in the client process (on the CPU) before the graph is submitted,
so an unknown model, a missing weights file, a bad model option or a deterministic model asked for
``draws > 1`` / MC-dropout is one :class:`~equiqc.workflows.config.ConfigError` before any pair is touched.
It also returns the sha256 of the weights file, which becomes part of every pair's result key.

:func:`environment` is the run-level record written into ``run.json``, the Parquet files' key-value
metadata (key ``equiqc.provenance``) and report.html: equiqc version and commit, Python, torch and CUDA
versions, the workers' devices, host, UTC start/end times, the command line, the model and the weights'
checksum.
"""

from __future__ import annotations

import datetime as dt
import platform
import re
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import equiqc
from equiqc.storage.cohort import file_sha256
from equiqc.workflows.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the --model spec
    backend: str  # the backend's own name
    weights_path: str | None
    weights_sha256: str | None
    stochastic: bool


def probe_model(config: RunConfig) -> ModelInfo:
    """Load ``config``'s model on the CPU here and check it can run this configuration; raise ConfigError."""
    from equiqc.pipeline.backends.registry import load_backend

    mc = config.method == "mc-dropout"
    what = f"--model {config.model}" + (f" --weights {config.weights}" if config.weights else "")
    try:
        backend = load_backend(config.model, weights=config.weights, device="cpu", mc_dropout=mc,
                               **config.model_options)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"{what}: the model cannot be loaded ({type(exc).__name__}: {exc})") from exc
    stochastic = bool(getattr(backend, "stochastic", False))
    if config.draws > 1 and not stochastic:
        raise ConfigError(f"option draws={config.draws} needs a stochastic model (dropout active, "
                          f"--method mc-dropout); {config.model!r} is deterministic: leave draws at 1")
    path = getattr(backend, "weights_path", None) or config.weights
    path = Path(path) if path else None
    digest = file_sha256(path) if path is not None and path.is_file() else None
    return ModelInfo(config.model, str(getattr(backend, "name", config.model)),
                     str(path.resolve()) if path else None, digest, stochastic)


def _git_commit() -> str | None:
    """The commit of an equiqc source checkout (editable install), with ``-dirty`` for uncommitted changes;
    else the ``+g<hash>`` that setuptools-scm put into the installed version; else None."""
    root = Path(equiqc.__file__).resolve().parent
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    match = re.search(r"\+g([0-9a-f]{7,40})", equiqc.__version__)
    return match.group(1) if match else None


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def environment(model: ModelInfo | None = None, devices: list[str] | None = None, started: str | None = None,
                argv: list[str] | None = None) -> dict:
    """The run-level provenance record (JSON-serialisable); ``finished`` is added when the run ends."""
    import torch

    return {
        "equiqc_version": equiqc.__version__,
        "equiqc_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "devices": sorted(set(devices or [])),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "started": started or now_utc(),
        "command_line": " ".join(argv if argv is not None else sys.argv),
        "model": asdict(model) if model else None,
    }


def device_description() -> str:
    """This process's compute device in words (runs on each worker through ``client.run``)."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"cpu ({platform.processor() or platform.machine()})"
