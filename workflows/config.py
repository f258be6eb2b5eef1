"""Run configuration: defaults, a YAML/TOML config file, and command-line overrides (in that order).

The part of the configuration that changes the numbers (model, weights, method, perturbation, K, batch
size, draws, seed) is recorded in each pair's completion marker (:meth:`RunConfig.result_key`); results of
another key are never mixed with these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib
import yaml

from pipeline.estimator import EstimatorConfig
from pipeline.perturbations import PerturbationConfig

METHODS = ("equivariance", "mc-dropout")
# Defaults that depend on the model, applied before the config file and flags (which override them).
# MultiPropReg recovers only part of a rigid motion (it was trained on affinely pre-aligned brains), so rigid
# or translation perturbations mostly measure that shortfall (about the same in every pair; rigid: ~5 mm std
# everywhere in the demo) and their test-time mean is worse than the prediction; it does undo smooth local
# perturbations (test-time mean = prediction), the family its equivariance covers (docs/validation.md).
MODEL_DEFAULTS: dict[str, dict] = {"multipropreg": {"perturbation": "diffeomorphic"}}
CLUSTERS = ("local", "cuda", "slurm", "pbs")


class ConfigError(ValueError):
    """A configuration the run cannot use; the message names the option and what to do."""


@dataclass
class RunConfig:
    model: str = "default"
    weights: str | None = None
    method: str = "equivariance"
    perturbation: str = "rigid"
    perturbation_options: dict = field(default_factory=dict)  # PerturbationConfig magnitudes
    model_options: dict = field(default_factory=dict)  # passed to the backend factory
    samples: int = 16
    batch_size: int = 4
    draws: int = 1
    seed: int = 0
    cluster: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    cluster_options: dict = field(default_factory=dict)  # dask-jobqueue / dask-cuda keyword arguments
    dashboard_address: str = "127.0.0.1:0"
    max_voxels: int | None = 64_000_000
    retries: int = 2
    overwrite: bool = False
    z_threshold: float = 3.0
    abs_threshold_mm: float = 4.0
    folding_threshold: float = 0.01
    label_names: dict = field(default_factory=dict)  # label value -> name for per-structure summaries

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.cluster not in CLUSTERS:
            raise ConfigError(f"--cluster {self.cluster!r}: choose one of {', '.join(CLUSTERS)}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        try:
            self.estimator_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def perturbation_config(self) -> PerturbationConfig:
        kind = "none" if self.method == "mc-dropout" else self.perturbation
        return PerturbationConfig(kind=kind, **self.perturbation_options)

    def estimator_config(self) -> EstimatorConfig:
        return EstimatorConfig(samples=self.samples, batch_size=self.batch_size, draws=self.draws,
                               perturbation=self.perturbation_config())

    def result_key(self) -> dict:
        """What determines the numbers: stored in every completion marker and compared on resume."""
        return {"model": self.model, "weights": self.weights, "model_options": self.model_options,
                "method": self.method, "perturbation": self.perturbation_config().to_dict(),
                "samples": self.samples, "batch_size": self.batch_size, "draws": self.draws, "seed": self.seed}

    def to_dict(self) -> dict:
        return asdict(self)


def load_config_file(path: str | Path) -> dict:
    """Options from a ``.yaml``/``.yml`` or ``.toml`` file (keys as in :class:`RunConfig`, ``-`` or ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({exc})") from exc
    data = {str(k).replace("-", "_"): v for k, v in (data or {}).items()}
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
    return data


def make_config(file: str | Path | None = None, **overrides) -> RunConfig:
    """Defaults <- the model's defaults (:data:`MODEL_DEFAULTS`) <- config file <- overrides (``None`` values
    in overrides are ignored)."""
    data = load_config_file(file) if file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    data = {**MODEL_DEFAULTS.get(str(data.get("model", "default")), {}), **data}
    try:
        return RunConfig(**data)
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc
