"""The estimator's settings (:class:`EstimatorConfig`), in a module without torch so that a run's configuration
takes its defaults from here before any model is loaded. The estimator itself is :mod:`equiqc.pipeline.estimator`."""

from __future__ import annotations

from dataclasses import dataclass, field

from equiqc.pipeline.perturbation_config import PerturbationConfig

__all__ = ["EstimatorConfig", "CPU_BATCH_SIZE", "GPU_MAX_BATCH_SIZE"]

# Measured with benchmarks/performance.py (default model, one thread, 2 mm MNI pair): on a CPU a batch of 1
# is the fastest per sample (a batch of 4 was 1.3x slower per sample for the network alone).
CPU_BATCH_SIZE = 1
# On a GPU the first pair of a shape tries every sample in one call (at most this many), halving on out-of-memory
# (equiqc.pipeline.estimator.default_batch_size).
GPU_MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class EstimatorConfig:
    """How many samples, in which batches, and of which perturbations.

    Attributes:
        samples: K, the number of perturbations.
        batch_size: forwards per model call (a batch always holds whole groups of ``draws``); ``None``: chosen
            for the device (:func:`equiqc.pipeline.estimator.default_batch_size`).
        draws: predictions per perturbation (>1 only for stochastic backends; enables the variance split).
        include_unperturbed: count the unperturbed prediction as one more sample (``tau = id``).
        covariance: compute the covariance components (``covariance_mm2`` and, with draws, the split); without
            it only the trace is accumulated (``std_mm``), which needs only the diagonal on axis-aligned grids.
    """

    samples: int = 16
    batch_size: int | None = None
    draws: int = 1
    include_unperturbed: bool = False
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)
    covariance: bool = True

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "draws"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"estimator option {name} must be an integer >= 1, got {value!r}")
        if self.samples * self.draws + int(self.include_unperturbed) * self.draws < 2:
            raise ValueError("at least two samples are needed to estimate a spread")
