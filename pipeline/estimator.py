"""Transformation-equivariance uncertainty of one registration (DESIGN.md, "The method").

For K random perturbations ``tau_k`` of the source grid:

1. ``A'_k = warp(A, tau_k)`` (the source presented in a perturbed frame),
2. ``phi'_k = R(A'_k, B)`` (one forward per batch of B samples),
3. ``psi_k = tau_k o phi'_k`` (exact for affine ``tau``; linear interpolation of ``tau`` otherwise),
4. per target voxel, the mean and covariance of ``psi_k`` in millimetres (source world space), streamed.

With a stochastic backend, ``draws`` predictions per perturbation split the covariance into the
intrinsic spread (within-perturbation) and the bias jitter (between-perturbation means).

Field of view: a sample is invalid at a voxel where ``psi_k`` falls outside the source grid, and, for the
diffeomorphic family (where ``tau`` is only known on the grid), where ``phi'_k`` does. ``n_valid`` counts
the valid samples per voxel; statistics use those only, and are NaN where fewer than two are valid.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from equiqc.pipeline import moments as M
from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.base import RegistrationBackend, check_prediction
from equiqc.pipeline.perturbations import PerturbationConfig, Perturbations, sample_perturbations

Tensor = torch.Tensor


@dataclass(frozen=True)
class EstimatorConfig:
    """How many samples, in which batches, and of which perturbations.

    samples: K, the number of perturbations.
    batch_size: forwards per model call (a batch always holds whole groups of ``draws``).
    draws: predictions per perturbation (>1 only for stochastic backends; enables the variance split).
    include_unperturbed: count the unperturbed prediction as one more sample (``tau = id``).
    """

    samples: int = 16
    batch_size: int = 4
    draws: int = 1
    include_unperturbed: bool = False
    perturbation: PerturbationConfig = field(default_factory=PerturbationConfig)

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "draws"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"estimator option {name} must be an integer >= 1, got {value!r}")
        if self.samples * self.draws + int(self.include_unperturbed) * self.draws < 2:
            raise ValueError("at least two samples are needed to estimate a spread")


def mc_dropout_config(samples: int = 16, batch_size: int = 4) -> EstimatorConfig:
    """The MC-dropout baseline: K unperturbed predictions of a backend built with ``mc_dropout=True``."""
    return EstimatorConfig(samples=samples, batch_size=batch_size, perturbation=PerturbationConfig(kind="none"))


@dataclass
class UncertaintyResult:
    """Per-voxel statistics on the target grid (spatial axes in array order).

    std_mm: ``sqrt(trace(Cov[psi]))`` in mm, ``(*target)``; NaN where ``n_valid < 2``.
    covariance_mm2: symmetric covariance components (mm^2), ``(n_comp, *target)``, order ``components``.
    mean_map: mean composed map ``E[psi]`` in source voxel units, ``(D, *target)``, NaN where no sample
        is valid (the test-time-augmented registration).
    prediction_map: the unperturbed prediction ``R(A, B)`` in source voxel units, ``(D, *target)``.
    n_valid: valid samples per voxel, ``(*target)``.
    intrinsic_spread_mm2, bias_jitter_mm2: the split of ``covariance_mm2`` (same layout) when the backend
        is stochastic and ``draws > 1``; they add up to ``covariance_mm2``.
    timings_s: wall time per stage (perturb, forward, compose, statistics, total), seconds.
    """

    std_mm: np.ndarray
    covariance_mm2: np.ndarray
    components: tuple[tuple[int, int], ...]
    mean_map: np.ndarray
    prediction_map: np.ndarray
    n_valid: np.ndarray
    n_samples: int
    intrinsic_spread_mm2: np.ndarray | None = None
    bias_jitter_mm2: np.ndarray | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def trace_mm2(self) -> np.ndarray:
        return self.std_mm.astype(np.float64) ** 2


@dataclass(frozen=True)
class _Group:
    tau: int  # index into the perturbations (the last one is the identity)
    draws: int
    counted: bool


def _batches(groups: list[_Group], capacity: int) -> Iterator[list[_Group]]:
    batch: list[_Group] = []
    for g in groups:
        if batch and sum(b.draws for b in batch) + g.draws > capacity:
            yield batch
            batch = []
        batch.append(g)
    if batch:
        yield batch


def with_identity(p: Perturbations) -> Perturbations:
    """The same perturbations with the identity appended as the last one."""
    if p.matrices is not None:
        eye = torch.eye(p.matrices.shape[-1], dtype=p.matrices.dtype)[None]
        return Perturbations(p.kind, p.shape, matrices=torch.cat([p.matrices, eye]))
    zero = torch.zeros_like(p.velocity[:1])
    return Perturbations(p.kind, p.shape, velocity=torch.cat([p.velocity, zero]))


def _as_batch(x: Tensor | np.ndarray, d: int | None = None) -> Tensor:
    x = torch.as_tensor(x)
    if d is None:
        d = x.dim() if x.dim() in (2, 3) else x.dim() - 2
    while x.dim() < d + 2:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError(f"estimate one pair at a time: got a batch of {x.shape[0]}")
    return x


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    def lap(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - start
        return now


def estimate_uncertainty(
    backend: RegistrationBackend,
    source: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    source_affine: np.ndarray | Tensor | None = None,
    target_affine: np.ndarray | Tensor | None = None,
    config: EstimatorConfig | None = None,
    seed: int = 0,
) -> UncertaintyResult:
    """Run the equivariance estimator on one pair.

    ``source``/``target``: ``(*spatial)``, ``(C, *spatial)`` or ``(1, C, *spatial)`` arrays (2D or 3D);
    affines are voxel-to-world (mm), identity when omitted. ``seed`` fixes the perturbations and the
    backend's own randomness (e.g. dropout): same inputs, seed and device give the same numbers. All
    computation happens on ``backend.device``; results come back as numpy arrays.
    """
    config = config or EstimatorConfig()
    if config.perturbation.kind == "none" and not backend.stochastic:
        raise ValueError(f"MC-dropout needs a stochastic backend (dropout active); {backend.name!r} is deterministic")
    if config.draws > 1 and not backend.stochastic:
        raise ValueError(f"draws={config.draws} needs a stochastic backend; {backend.name!r} is deterministic")
    device = torch.device(backend.device)
    src = _as_batch(source).to(device=device, dtype=torch.float32)
    d = src.dim() - 2
    tgt = _as_batch(target, d).to(device=device, dtype=torch.float32)
    a_src = T.as_matrix(source_affine, d, device=device)
    a_tgt = T.as_matrix(target_affine, d, device=device)
    src_shape, tgt_shape = tuple(src.shape[2:]), tuple(tgt.shape[2:])

    pert = with_identity(sample_perturbations(config.perturbation, config.samples, src_shape, a_src.cpu(), seed))
    identity = config.samples
    groups = [_Group(identity, config.draws if config.include_unperturbed else 1, config.include_unperturbed)]
    groups += [_Group(k, config.draws, True) for k in range(config.samples)]

    stats = M.StreamingMoments(d, tgt_shape, device)
    prediction: Tensor | None = None
    timer = _Timer(device)
    t_start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in _batches(groups, max(config.batch_size, config.draws)):
            t0 = time.perf_counter()
            index = torch.tensor([g.tau for g in batch for _ in range(g.draws)])
            tau = pert.maps(index, device)
            moved = T.warp(src, tau)
            t0 = timer.lap("perturb", t0)
            phi_p = check_prediction(
                backend.register(moved, tgt.expand(len(index), *tgt.shape[1:]), a_src, a_tgt), moved, tgt
            )
            t0 = timer.lap("forward", t0)
            psi = pert.compose_back(index, phi_p, None if pert.is_affine else tau)
            valid = T.inside_grid(psi, src_shape)
            if not pert.is_affine:
                valid &= T.inside_grid(phi_p, src_shape)
            if prediction is None:
                prediction = phi_p[0].clone()
            t0 = timer.lap("compose", t0)
            counted = torch.tensor([g.counted for g in batch for _ in range(g.draws)], device=device)
            if counted.any():
                group = torch.tensor([i for i, g in enumerate(batch) if g.counted for _ in range(g.draws)],
                                     device=device)
                group -= group.min()
                psi_mm = T.voxel_to_mm(psi[counted], a_src)  # float32: centred inside the accumulator
                stats.update(psi_mm, valid[counted], group)
            timer.lap("statistics", t0)
            del tau, moved, phi_p, psi

        cov = stats.covariance("total")
        std = torch.sqrt(M.trace(cov, d).clamp_min(0))
        mean_vox = T.mm_to_voxel(stats.mean_value()[None], a_src)[0]
        mean_vox = torch.where(stats.count > 0, mean_vox, torch.full_like(mean_vox, float("nan")))
        split = config.draws > 1
        result = UncertaintyResult(
            std_mm=std.float().cpu().numpy(),
            covariance_mm2=cov.float().cpu().numpy(),
            components=stats.comps,
            mean_map=mean_vox.float().cpu().numpy(),
            prediction_map=prediction.float().cpu().numpy(),
            n_valid=stats.count.round().to(torch.int32).cpu().numpy(),
            n_samples=sum(g.draws for g in groups if g.counted),
            intrinsic_spread_mm2=stats.covariance("within").float().cpu().numpy() if split else None,
            bias_jitter_mm2=stats.covariance("between").float().cpu().numpy() if split else None,
        )
    timer.lap("total", t_start)
    result.timings_s = timer.times
    return result
