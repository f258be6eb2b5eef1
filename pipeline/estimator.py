"""Transformation-equivariance uncertainty of one registration (DESIGN.md, "The method").

For K random perturbations ``tau_k`` of the source grid:

1. ``A'_k = warp(A, tau_k)`` (the source presented in a perturbed frame),
2. ``phi'_k = R(A'_k, B)`` (one forward per batch of B samples),
3. ``psi_k = tau_k o phi'_k`` (exact for affine ``tau``; linear interpolation of ``tau`` otherwise),
4. per target voxel, the mean and covariance of ``psi_k``, streamed (float32 sums of samples centred per
   voxel, in source voxel units; converted to millimetres once at the end with the source affine).

For affine families, steps 1-3 are one backend call (:func:`~equiqc.pipeline.backends.base.register_perturbed`):
an adapter with that hook samples the source once, straight onto its network grid, and folds ``tau_k`` into
its own map back. For the diffeomorphic family, steps 1-2 are one call
(:func:`~equiqc.pipeline.backends.base.register_warped`: the source sampled once at ``tau_k`` of the network
grid) and step 3 evaluates ``tau_k``'s coarse displacement at ``phi'_k``. The target is prepared once per pair
(:func:`~equiqc.pipeline.backends.base.prepare`).

With a stochastic backend, ``draws`` predictions per perturbation split the covariance into the
intrinsic spread (within-perturbation) and the bias jitter (between-perturbation means).

Field of view: a sample is invalid at a voxel where ``psi_k`` falls outside the source grid, and, for the
diffeomorphic family (where ``tau`` is only known on the grid), where ``phi'_k`` does. ``n_valid`` counts
the valid samples per voxel; statistics use those only, and are NaN where fewer than
:func:`min_valid_samples` are valid (a quarter of the samples, at least 3).

The prediction (``prediction_map``) is the backend's unperturbed registration; for a stochastic backend it is
computed with its randomness off (:func:`~equiqc.pipeline.backends.base.deterministic`, dropout off), the
registration a user would apply, not one random draw.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from equiqc.pipeline import moments as M
from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends import base as B
from equiqc.pipeline.backends.base import RegistrationBackend
from equiqc.pipeline.estimator_config import CPU_BATCH_SIZE, GPU_MAX_BATCH_SIZE, EstimatorConfig
from equiqc.pipeline.perturbations import PerturbationConfig, Perturbations, sample_perturbations

__all__ = ["EstimatorConfig", "UncertaintyResult", "estimate_uncertainty", "min_valid_samples", "mc_dropout_config"]
Tensor = torch.Tensor


# A voxel's spread is reported only where at least this fraction of the samples (and never fewer than
# MIN_VALID_SAMPLES) stayed in the field of view: a std from 2 of 16 samples is mostly noise.
MIN_VALID_FRACTION = 0.25
MIN_VALID_SAMPLES = 3


def min_valid_samples(n_samples: int) -> int:
    """Valid samples a voxel needs for ``std_mm`` (and the covariances) to be reported: ``max(3, ceil(n / 4))``,
    at most ``n_samples`` (so a run of 2 samples still reports where both are valid)."""
    return min(n_samples, max(MIN_VALID_SAMPLES, math.ceil(MIN_VALID_FRACTION * n_samples)))


# GPU batch sizes that fit, remembered for later pairs of the same backend and shapes (per worker process).
_GPU_BATCH: dict[tuple, int] = {}


def default_batch_size(device: torch.device | str, samples: int) -> int:
    """Forwards per model call when none is asked for: 1 on a CPU, all ``samples`` (at most
    :data:`~equiqc.pipeline.estimator_config.GPU_MAX_BATCH_SIZE`) on a GPU, where out-of-memory halves it (see
    :func:`estimate_uncertainty`)."""
    return CPU_BATCH_SIZE if torch.device(device).type != "cuda" else max(1, min(samples, GPU_MAX_BATCH_SIZE))


def mc_dropout_config(samples: int = EstimatorConfig.samples, batch_size: int | None = None) -> EstimatorConfig:
    """The MC-dropout baseline: K unperturbed predictions of a backend built with ``mc_dropout=True``."""
    return EstimatorConfig(samples=samples, batch_size=batch_size, perturbation=PerturbationConfig(kind="none"))


@dataclass
class UncertaintyResult:
    """Per-voxel statistics on the target grid (spatial axes in array order).

    Attributes:
        std_mm: ``sqrt(trace(Cov[psi]))`` in mm, ``(*target)``; NaN where ``n_valid < min_valid_samples(n_samples)``.
        covariance_mm2: symmetric covariance components (mm^2), ``(n_comp, *target)``, order ``components``
            (source world axes); ``None`` when the estimate was asked for the spread only.
        mean_map: mean composed map ``E[psi]`` in source voxel units, ``(D, *target)``, NaN where no sample
            is valid (the test-time-augmented registration).
        prediction_map: the unperturbed prediction ``R(A, B)`` in source voxel units, ``(D, *target)``; or the
            registration given to :func:`estimate_uncertainty` (``prediction_given``).
        n_valid: valid samples per voxel, ``(*target)``.
        intrinsic_spread_mm2, bias_jitter_mm2: the split of ``covariance_mm2`` (same layout) when the backend
            is stochastic and ``draws > 1``; they add up to ``covariance_mm2``.
        timings_s: wall time per stage, seconds: prepare (the backend's per-pair work), perturb (dense
            perturbations: integrating the coarse field), forward (the backend's calls, including sampling the
            perturbed source and mapping back), compose (composing back, validity), statistics, total.
        batch_size: the forwards per model call the estimate ran with (after any out-of-memory halving).
    """

    std_mm: np.ndarray
    covariance_mm2: np.ndarray | None
    components: tuple[tuple[int, int], ...]
    mean_map: np.ndarray
    prediction_map: np.ndarray
    n_valid: np.ndarray
    n_samples: int
    intrinsic_spread_mm2: np.ndarray | None = None
    bias_jitter_mm2: np.ndarray | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0
    prediction_given: bool = False

    @property
    def trace_mm2(self) -> np.ndarray:
        return self.std_mm.astype(np.float64) ** 2


@dataclass(frozen=True)
class _Group:
    tau: int  # index into the perturbations (the last one is the identity)
    draws: int
    counted: bool


def _take(groups: list[_Group], capacity: int) -> list[_Group]:
    """The next batch: whole groups from the front of ``groups``, at most ``capacity`` forwards (at least one group)."""
    batch, size = [], 0
    for g in groups:
        if batch and size + g.draws > capacity:
            break
        batch.append(g)
        size += g.draws
    return batch


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
    prediction: Tensor | np.ndarray | None = None,
) -> UncertaintyResult:
    """Run the equivariance estimator on one pair.

    ``source``/``target``: ``(*spatial)``, ``(C, *spatial)`` or ``(1, C, *spatial)`` arrays (2D or 3D);
    affines are voxel-to-world (mm), identity when omitted. ``seed`` fixes the perturbations and the
    backend's own randomness (e.g. dropout): same inputs, seed, device and batch size give the same numbers
    (another batch size draws the same perturbations; only the network's float rounding differs, ~1e-6).
    All computation happens on ``backend.device``; results come back as numpy arrays.

    ``prediction``: a registration already made for this pair (``(D, *target)``, source voxel units, e.g. a
    pipeline's transform file, :mod:`equiqc.storage.transform_files`): it becomes ``prediction_map`` and the
    backend's unperturbed registration is not run (``prediction_given`` is then true).
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
    pending = [_Group(identity, config.draws if config.include_unperturbed else 1, config.include_unperturbed)]
    pending += [_Group(k, config.draws, True) for k in range(config.samples)]
    n_samples = sum(g.draws for g in pending if g.counted)

    linear = a_src[:d, :d].cpu()  # source voxel units -> mm
    split = config.draws > 1
    full = config.covariance or split
    weights = M.trace_weights(linear)  # trace(Cov_mm) from the voxel-unit components (spread-only mode)
    comps = M.components(d) if full else tuple(weights)
    stats = M.StreamingMoments(d, tgt_shape, device, comps=comps)
    given = prediction is not None
    if given:
        prediction = torch.as_tensor(prediction).to(device=device, dtype=torch.float32)
        if tuple(prediction.shape) != (d, *tgt_shape):
            raise ValueError(f"the given prediction has shape {tuple(prediction.shape)}; expected {(d, *tgt_shape)} "
                             "(one channel per axis, on the target grid)")
        pending = [g for g in pending if g.counted]  # the unperturbed registration is not needed
    timer = _Timer(device)
    t_start = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    auto = config.batch_size is None
    cache_key = (id(backend), str(device), src_shape, tgt_shape, config.draws)
    forwards = sum(g.draws for g in pending)
    capacity = max(config.batch_size or _GPU_BATCH.get(cache_key, default_batch_size(device, forwards)),
                   config.draws)
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        pair = B.prepare(backend, src, tgt, a_src, a_tgt)
        t0 = timer.lap("prepare", t0)
        if backend.stochastic and not given:  # the prediction a user applies: randomness off, outside the samples
            with B.deterministic(backend):
                prediction = _predict(backend, pair, pert, [_Group(identity, 1, False)], timer, src_shape,
                                      tgt_shape)[2].clone()
            pending = [g for g in pending if g.counted]
        while pending:
            batch = _take(pending, capacity)
            try:
                psi, valid, phi_identity = _predict(backend, pair, pert, batch, timer, src_shape, tgt_shape)
            except torch.OutOfMemoryError:
                if not auto or capacity <= config.draws:
                    raise
                torch.cuda.empty_cache()
                capacity = max(config.draws, capacity // 2)
                _GPU_BATCH[cache_key] = capacity
                continue
            del pending[: len(batch)]
            t0 = time.perf_counter()
            if prediction is None:
                prediction = phi_identity.clone()
            counted = torch.tensor([g.counted for g in batch for _ in range(g.draws)], device=device)
            if counted.any():
                group = torch.tensor([i for i, g in enumerate(batch) if g.counted for _ in range(g.draws)],
                                     device=device)
                stats.update(psi[counted] if not counted.all() else psi, valid[counted] if not counted.all()
                             else valid, group - group.min())
            timer.lap("statistics", t0)
            del psi, valid

        t0 = time.perf_counter()
        reported = stats.count >= min_valid_samples(n_samples)
        cov_vox = stats.covariance("total")
        if full:
            cov = M.transform(cov_vox, comps, linear)
            std = torch.sqrt(M.trace(cov, d).clamp_min(0))
        else:
            cov = None
            trace = sum(w * cov_vox[k] for k, w in enumerate(weights.values()))
            std = torch.sqrt(trace.clamp_min(0))
        std = torch.where(reported, std, float("nan"))
        if cov is not None:
            cov = torch.where(reported, cov, float("nan"))
        mean_vox = stats.mean_value()
        mean_vox = torch.where(stats.count > 0, mean_vox, torch.full_like(mean_vox, float("nan")))
        result = UncertaintyResult(
            std_mm=std.float().cpu().numpy(),
            covariance_mm2=None if cov is None else cov.float().cpu().numpy(),
            components=M.components(d),
            mean_map=mean_vox.float().cpu().numpy(),
            prediction_map=prediction.float().cpu().numpy(),
            n_valid=stats.count.round().to(torch.int32).cpu().numpy(),
            n_samples=n_samples,
            prediction_given=given,
            intrinsic_spread_mm2=_split_term(stats, "within", comps, linear, reported) if split else None,
            bias_jitter_mm2=_split_term(stats, "between", comps, linear, reported) if split else None,
        )
        timer.lap("statistics", t0)
    timer.lap("total", t_start)
    result.timings_s = timer.times
    result.batch_size = capacity
    return result


def _split_term(stats: M.StreamingMoments, which: str, comps, linear: Tensor, reported: Tensor) -> np.ndarray:
    term = torch.where(reported, M.transform(stats.covariance(which), comps, linear), float("nan"))
    return term.float().cpu().numpy()


def _predict(backend, pair, pert: Perturbations, batch: list[_Group], timer: _Timer, src_shape, tgt_shape):
    """Composed-back predictions ``psi`` ``(b, D, *target)`` (source voxels) of one batch, their validity, and
    the prediction of the batch's first sample (a view; the unperturbed one in the first batch)."""
    index = torch.tensor([g.tau for g in batch for _ in range(g.draws)])
    t0 = time.perf_counter()
    if pert.is_affine:
        psi = B.check_prediction(B.register_perturbed(backend, pair, pert.matrices[index]), len(index), tgt_shape)
        t0 = timer.lap("forward", t0)
        valid = T.inside_grid(psi, src_shape)
        first = psi[0]
    else:
        tau = pert.dense(index, pair.source.device)  # integrated on its coarse grid
        t0 = timer.lap("perturb", t0)
        phi_p = B.check_prediction(B.register_warped(backend, pair, tau), len(index), tgt_shape)
        t0 = timer.lap("forward", t0)
        psi = pert.compose_back(index, phi_p, tau)
        valid = T.inside_grid(psi, src_shape) & T.inside_grid(phi_p, src_shape)
        first = phi_p[0]
    timer.lap("compose", t0)
    return psi, valid, first
