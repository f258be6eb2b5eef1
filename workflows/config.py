"""Run configuration: defaults, a YAML/TOML config file, and command-line overrides (in that order).

Every option is a field of :class:`RunConfig` whose type hint and ``metadata`` (``choices``, ``min``,
``max``, ``help``) are the schema: :func:`validate` checks each value against it and raises one
:class:`ConfigError` naming the option, the value and what is allowed. Nothing is coerced: ``workers: "8"``
in a YAML file is a string and is refused, not guessed.

The part of the configuration that changes the numbers (model, the sha256 of its weights, method,
perturbation, K, draws, seed, storage level, and :data:`~equiqc.pipeline.numerics.NUMERICS_VERSION`) is
recorded in each pair's completion marker (:meth:`RunConfig.result_key`); results of another key are never
mixed with these.

This module imports neither torch nor Dask, so ``equiqc --help`` stays fast.
"""

from __future__ import annotations

import functools
import math
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from equiqc.errors import UserError
from equiqc.pipeline.backends.registry import model_defaults
from equiqc.pipeline.decision import DEVIATION_SPREAD_FACTOR, DecisionRules
from equiqc.pipeline.estimator_config import CPU_BATCH_SIZE, GPU_MAX_BATCH_SIZE, EstimatorConfig
from equiqc.pipeline.perturbation_config import KINDS, PerturbationConfig
from equiqc.storage.levels import DEFAULT_LEVEL, STORE_LEVELS

METHODS = ("equivariance", "mc-dropout")
# The command-line groups an option belongs to (field metadata ``cli``): RUN is every command that runs a cohort
# (run, demo, calibrate, bids, fmriprep), ESTIMATE the one-pair ``equiqc estimate``. workflows/cli.py makes each
# option's flag from its field here (name, type, default, choices, help): declare an option once, below.
RUN, ESTIMATE = "run", "estimate"
BOTH = (RUN, ESTIMATE)
RUN_COMMANDS = ("run", "demo", "calibrate", "bids", "fmriprep")  # the commands of group RUN
CLUSTERS = ("local", "cuda", "slurm", "pbs")


class ConfigError(UserError, ValueError):
    """A configuration the run cannot use; the message names the option and what to do."""


def _opt(default, help: str, **rules):
    """A config field: its default, a one-line meaning, and validation rules (choices, min, max, internal) and the
    command-line groups that take it as a flag (``cli``; :func:`cli_options`)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, **rules})


@dataclass
class RunConfig:
    model: str = _opt("default", "default | affine-opt | ants | unigradicon | multigradicon | multipropreg | "
                      "torchscript:PATH | python:package.module:factory | an equiqc.backends entry point", cli=BOTH)
    weights: str | None = _opt(None, "local weights file for the model (nothing is downloaded)", cli=BOTH)
    method: str = _opt("equivariance", "equivariance or mc-dropout", choices=METHODS, cli=(RUN,))
    perturbation: str = _opt(PerturbationConfig.kind, "perturbation family", choices=KINDS,
                             cli=BOTH, default_text=f"the model's, {PerturbationConfig.kind} for most models")
    perturbation_options: dict = _opt(dict, "PerturbationConfig magnitudes (mm, degrees)")
    model_options: dict = _opt(dict, "keyword arguments of the backend factory (convention, input_shape...)")
    samples: int = _opt(EstimatorConfig.samples, "K perturbations (or MC-dropout samples) per pair",
                        min=1, cli=BOTH, default_text=f"the model's, {EstimatorConfig.samples} for most models")
    batch_size: int | None = _opt(EstimatorConfig.batch_size, "samples per model call", min=1,
                                  cli=BOTH, default_text=f"{CPU_BATCH_SIZE} on a CPU, where it is fastest per "
                                  f"sample; on a GPU as many as memory allows, up to {GPU_MAX_BATCH_SIZE}")
    draws: int = _opt(EstimatorConfig.draws, "predictions per perturbation (stochastic models only)",
                      min=1, cli=BOTH)
    seed: int = _opt(0, "run seed; each pair's generator is seeded by (seed, pair id)", min=0, cli=BOTH)
    cluster: str = _opt("local", "local, cuda, slurm or pbs", choices=CLUSTERS, cli=(RUN,))
    scheduler: str | None = _opt(None, "address of an existing Dask scheduler (tcp://host:port)", cli=(RUN,))
    workers: int | None = _opt(None, "worker processes (local), GPUs (cuda) or jobs (slurm/pbs)", min=1, cli=(RUN,),
                               default_text="one per core or GPU")
    cluster_options: dict = _opt(dict, "dask-jobqueue / dask-cuda / LocalCluster keyword arguments")
    gpus_per_worker: int | None = _opt(None, "slurm/pbs: GPUs each job requests; its worker runs one thread and "
                                       "advertises GPU=1 (equiqc uses one GPU per worker)", choices=(1,))
    dashboard_address: str = _opt("127.0.0.1:0", "where the Dask dashboard of a cluster started here listens")
    max_voxels: int | None = _opt(64_000_000, "refuse volumes larger than this (memory guard)", min=1, cli=(RUN,))
    retries: int = _opt(2, "times a task lost with its worker is retried", min=0)
    overwrite: bool = _opt(False, "replace results of another configuration in the output folder", cli=(RUN,))
    # Options the pipeline takes have their defaults in its dataclasses (EstimatorConfig, PerturbationConfig, and
    # DecisionRules for the decision's thresholds, with why): read from there, never written twice.
    tolerance_mm: float = _opt(DecisionRules.tolerance_mm, "registration error (mm) a pair may "
                               "have: above it, reason 'uncertainty'", min=0, cli=(RUN,))
    folding_threshold: float = _opt(DecisionRules.folding_threshold, "folding fraction above which "
                                    "a pair is flagged", min=0, max=1)
    noise_floor_mm: float = _opt(DecisionRules.noise_floor_mm, "added to the p95 spread before the "
                                 "cohort's log-scale context", min=0.001)
    fence_mad: float = _opt(DecisionRules.fence_mad, "cohort fences (reasons 'outlier', "
                            "'similarity'): median +- this many robust sds (1.4826 MAD) of the cohort's log p95 "
                            "spread and similarity", min=0)
    fov_threshold: float = _opt(DecisionRules.fov_threshold, "fraction of the region mapped "
                                "outside the source above which a pair is flagged (reason 'fov')", min=0, max=1)
    deviation_mm: float = _opt(DecisionRules.deviation_mm, "a given transform (manifest column "
                               "transform) whose 95th-percentile distance from the perturbed registrations' mean is "
                               f"above this (mm) and above {DEVIATION_SPREAD_FACTOR:g}x the pair's p95 spread is "
                               "flagged 'deviation'", min=0,
                               cli=(RUN,))
    label_names: dict = _opt(dict, "label value -> name for per-structure summaries")
    store: str = _opt(DEFAULT_LEVEL, "what results.zarr keeps per pair: minimal (std_mm, n_valid), standard (adds "
                      "the prediction, for export and figures), full (every array)", choices=tuple(STORE_LEVELS),
                      cli=(RUN,))
    calibration: str | None = _opt(None, "calibration file (equiqc calibrate) giving expected_error_mm and its upper "
                                   "bound; default: the one shipped for the model when the setting matches; "
                                   "'none': no calibration", cli=(RUN,))
    # Filled by the run from the model it loaded, never by the user: the weights' checksum keys resume.
    weights_sha256: str | None = _opt(None, "sha256 of the model's weights file (set by the run)", internal=True)

    def __post_init__(self) -> None:
        validate(self)

    def perturbation_config(self) -> PerturbationConfig:
        kind = "none" if self.method == "mc-dropout" else self.perturbation
        return PerturbationConfig(kind=kind, **self.perturbation_options)

    def decision_rules(self) -> DecisionRules:
        """The :class:`~equiqc.pipeline.decision.DecisionRules` of this run."""
        return DecisionRules(**{name: getattr(self, name) for name in _shared_fields(DecisionRules)})

    def estimator_config(self) -> EstimatorConfig:
        """The :class:`~equiqc.pipeline.estimator_config.EstimatorConfig` of this run."""
        return EstimatorConfig(samples=self.samples, batch_size=self.batch_size, draws=self.draws,
                               perturbation=self.perturbation_config(),
                               covariance="covariance_mm2" in STORE_LEVELS[self.store])

    def result_key(self) -> dict:
        """What determines the numbers: stored in every completion marker and compared on resume."""
        from equiqc.pipeline.numerics import NUMERICS_VERSION

        return {"model": self.model, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "model_options": self.model_options, "method": self.method,
                "perturbation": self.perturbation_config().to_dict(), "samples": self.samples,
                "draws": self.draws, "seed": self.seed,
                "numerics_version": NUMERICS_VERSION, "store": self.store}

    def calibration_setting(self) -> dict:
        """What a calibration depends on (a calibration file's ``setting`` must equal it): the model and its
        weights' checksum, model options, method, perturbation, K and draws. Not the seed or batch size."""
        return {"model": self.model, "weights_sha256": self.weights_sha256, "model_options": self.model_options,
                "method": self.method, "perturbation": self.perturbation_config().to_dict(),
                "samples": self.samples, "draws": self.draws}

    def to_dict(self) -> dict:
        return asdict(self)


def _shared_fields(cls) -> list[str]:
    """The fields of the pipeline's dataclass ``cls`` that are options of :class:`RunConfig` (same name)."""
    ours = {f.name for f in fields(RunConfig)}
    return [f.name for f in fields(cls) if f.name in ours]


def _type_ok(value, hint) -> bool:
    if hint is typing.Any:
        return True
    args = typing.get_args(hint)
    if args:  # a union such as int | None
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
               dict: "a mapping", type(None): "nothing (null)"}


def _describe(hint) -> str:
    args = typing.get_args(hint) or (hint,)
    return " or ".join(_TYPE_WORDS.get(a, getattr(a, "__name__", str(a))) for a in args)


@functools.cache
def _hints() -> dict:
    """RunConfig's field types, resolved once per process (``typing.get_type_hints`` compiles every annotation:
    about 1.5 ms, which every task paid when it rebuilt its configuration)."""
    return typing.get_type_hints(RunConfig)


def validate(config: RunConfig) -> None:
    """Check every option against the schema (types, choices, ranges, nested options); raise ConfigError."""
    hints = _hints()
    for f in fields(RunConfig):
        value, rules = getattr(config, f.name), f.metadata
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(f"option {f.name}: {value!r} ({type(value).__name__}) is not allowed; expected "
                              f"{_describe(hints[f.name])} ({rules['help']})")
        if value is None:
            continue
        if "choices" in rules and value not in rules["choices"]:
            allowed = ", ".join(map(str, rules["choices"]))
            raise ConfigError(f"option {f.name}: {value!r} is not allowed; choose one of {allowed}")
        if "min" in rules and value < rules["min"]:
            raise ConfigError(f"option {f.name}: {value!r} is not allowed; it must be >= {rules['min']}")
        if "max" in rules and value > rules["max"]:
            raise ConfigError(f"option {f.name}: {value!r} is not allowed; it must be <= {rules['max']}")
    known = {f.name for f in fields(PerturbationConfig)} - {"kind"}
    unknown = sorted(set(config.perturbation_options) - known)
    if unknown:
        raise ConfigError(f"option perturbation_options: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        config.perturbation_config()
    except ValueError as exc:
        raise ConfigError(f"option perturbation_options: {exc}") from exc
    for key in config.label_names:
        try:
            int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"option label_names: key {key!r} is not a label value (an integer)") from None
    if config.gpus_per_worker and config.cluster in ("local", "cuda") and not config.scheduler:
        why = ("already gives each worker one GPU" if config.cluster == "cuda"
               else "has no GPU workers: use --cluster cuda")
        raise ConfigError(f"option gpus_per_worker is for --cluster slurm/pbs (or --scheduler); --cluster "
                          f"{config.cluster} {why}")
    if config.samples * config.draws < 2:
        raise ConfigError("options samples x draws must be at least 2 to estimate a spread")
    if config.method == "mc-dropout" and config.draws > 1:
        raise ConfigError("option draws: MC-dropout already draws one prediction per sample; leave draws at 1")


def cli_options(group: str) -> list[tuple[str, type, object, dict]]:
    """The options the command-line group ``group`` (:data:`RUN`, :data:`ESTIMATE`) takes as flags:
    ``(name, base type, default, metadata)`` per option, in declaration order (workflows/cli.py builds the flags)."""
    hints = _hints()
    out = []
    for f in fields(RunConfig):
        if group in f.metadata.get("cli", ()):
            base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            default = f.default_factory() if callable(f.default_factory) else f.default
            out.append((f.name, base, default, dict(f.metadata)))
    return out


def flag_name(option: str) -> str:
    """The command-line flag of config option ``option`` (``tolerance_mm`` -> ``--tolerance-mm``)."""
    return "--" + option.replace("_", "-")


def _allowed(rules: dict) -> str:
    if "choices" in rules:
        return " | ".join(map(str, rules["choices"]))
    bounds = [f">= {rules['min']}" if "min" in rules else "", f"<= {rules['max']}" if "max" in rules else ""]
    return ", ".join(b for b in bounds if b)


def _default_text(default, rules: dict) -> str:
    if "default_text" in rules:
        return rules["default_text"]
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else repr(default)


def option_rows() -> list[dict]:
    """Every option a user can set (not the internal ones), in declaration order, as text: ``name``, ``flag``
    (empty: config file only), ``commands`` (those taking the flag), ``type``, ``default`` (a value, or a sentence
    where ``default_is_prose``: the model's, the device's), ``allowed`` (choices or range) and ``help``.
    ``equiqc options`` prints them and the docs' reference is built from them."""
    hints = _hints()
    rows = []
    for f in fields(RunConfig):
        rules = f.metadata
        if rules.get("internal"):
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        groups = rules.get("cli", ())
        commands = [*(RUN_COMMANDS if RUN in groups else ()), *(("estimate",) if ESTIMATE in groups else ())]
        rows.append({"name": f.name, "flag": flag_name(f.name) if groups else "", "commands": ", ".join(commands),
                     "type": _describe(hints[f.name]), "default": _default_text(default, rules),
                     "default_is_prose": "default_text" in rules, "allowed": _allowed(rules), "help": rules["help"]})
    return rows


def options_help() -> str:
    """Every config-file option with its flag, type, default and meaning (``equiqc options``)."""
    lines = []
    for row in option_rows():
        flag = f"{row['flag']} ({row['commands']})" if row["flag"] else "config file only"
        allowed = f"; allowed: {row['allowed']}" if row["allowed"] else ""
        lines.append(f"{row['name']}  [{flag}]\n    {row['type']}; default: {row['default']}{allowed}\n"
                     f"    {row['help']}")
    return "\n".join(lines)


def config_from_record(data: dict) -> RunConfig:
    """A RunConfig from the ``config`` of a run.json; options that no longer exist (written by an older equiqc,
    e.g. ``z_threshold``) are dropped, since they do not change stored results."""
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in data.items() if k in known})


def load_config_file(path: str | Path) -> dict:
    """Options from a ``.yaml``/``.yml`` or ``.toml`` file (keys as in :class:`RunConfig`, ``-`` or ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({exc})") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in (data or {}).items()}
    known = {f.name for f in fields(RunConfig) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - known)
    if unknown:
        hint = f" ({RENAMED[unknown[0]]})" if unknown[0] in RENAMED else ""
        raise ConfigError(f"{path}: unknown option {unknown[0]!r}{hint}; known options: {', '.join(sorted(known))}")
    return data


RENAMED = {"fence_iqr": "replaced by fence_mad: the cohort fences are now the median +- k robust sds, k = 3.5 "
                        "by default; a quartile fence's k does not carry over"}


def make_config(file: str | Path | None = None, model_options: dict | None = None, **overrides) -> RunConfig:
    """Defaults <- the model's recommendations (:func:`~equiqc.pipeline.backends.registry.model_defaults`) <-
    config file <- overrides (``None`` values in overrides are ignored). ``model_options`` from flags are merged
    into the file's ``model_options``."""
    data = load_config_file(file) if file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if model_options:
        if not isinstance(data.get("model_options", {}), dict):
            raise ConfigError(f"option model_options: expected a mapping, got {data['model_options']!r}")
        data["model_options"] = {**data.get("model_options", {}), **model_options}
    data = {**model_defaults(str(data.get("model", "default"))), **data}
    return RunConfig(**data)
