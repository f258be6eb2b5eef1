"""The protocol every registration model adapter implements.

An adapter wraps one model and speaks DESIGN's convention on both sides:

* inputs: ``source`` ``(B, C, *source_shape)`` and ``target`` ``(B, C, *target_shape)`` float tensors on
  ``device`` (the same target repeated along the batch), plus the voxel-to-world affines (mm) of the two
  grids as ``(D+1, D+1)`` float64 tensors, for adapters that must resample to a fixed physical input;
* output: maps ``(B, D, *target_shape)`` from the target grid into the source, in source voxel index
  units, channel ``d`` = array axis ``d`` (pull-back: ``warp(source, phi) ~ target``).

Each adapter converts its model's native convention (normalised coordinates, reversed axes, voxel
displacements, fixed input shape) to this one and back; the estimator never sees the native form.

``register`` is all an adapter must provide. Two optional hooks let it skip repeated work, and the
functions below fall back to ``register`` for an adapter without them:

* ``prepare(source, target, source_affine, target_affine) -> PreparedPair``: once per pair (e.g. the target
  normalised and resampled onto the network grid once, not in every batch), then
  ``register_prepared(pair, sources)`` for a batch of (perturbed) sources of that pair;
* ``register_perturbed(pair, matrices)``: for affine perturbations ``T_b``, the composed-back maps
  ``T_b o R(A o T_b, B)`` in one go, so the source is interpolated once, straight onto the network grid, and
  ``T_b`` is folded into the adapter's own map back;
* ``register_warped(pair, tau)``: the same for dense perturbations ``tau`` (a
  :class:`~equiqc.pipeline.perturbations.DenseWarp`): the predictions ``R(A o tau_b, B)`` (not composed back),
  the source sampled once at ``tau`` of the network grid's positions;
* ``deterministic()``: a context manager in which a stochastic adapter predicts without its randomness
  (dropout off), for the prediction a user would apply. Without it that prediction is one random draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from equiqc.pipeline import transforms as T

if TYPE_CHECKING:
    from equiqc.pipeline.perturbations import DenseWarp

Tensor = torch.Tensor


@runtime_checkable
class RegistrationBackend(Protocol):
    """What a registration model must provide to be used by the estimator.

    Attributes:
        name: short identifier recorded in result metadata (e.g. ``"default"``, ``"unigradicon"``).
        device: where the model runs; the estimator moves data there and computes statistics there.
        stochastic: ``True`` when two calls on the same input may differ (e.g. dropout active); the
            estimator then runs several draws per perturbation and splits the variance.
        input_shape: the fixed spatial shape the network itself consumes (after the adapter's own
            resampling), or ``None`` when any shape works. Informational: adapters resample internally.
        weights_path: optional; the file the model's weights were read from. When present, a run records
            its sha256 in its provenance and in every pair's result key (so replacing the file recomputes).
    """

    name: str
    device: torch.device
    stochastic: bool
    input_shape: tuple[int, ...] | None

    def register(
        self,
        source: Tensor,
        target: Tensor,
        source_affine: Tensor | None = None,
        target_affine: Tensor | None = None,
    ) -> Tensor:
        """Predict maps ``(B, D, *target_shape)`` (source voxel units) registering ``source`` to ``target``."""
        ...


@dataclass
class PreparedPair:
    """One pair as the estimator hands it to a backend: ``(1, C, *shape)`` float tensors on the backend's
    device and ``(D+1, D+1)`` float64 voxel-to-world affines (mm). Adapters with a ``prepare`` hook return a
    subclass holding what they computed once (a resampled target, cached grids)."""

    source: Tensor
    target: Tensor
    source_affine: Tensor
    target_affine: Tensor


def prepare(backend: RegistrationBackend, source: Tensor, target: Tensor, source_affine: Tensor,
            target_affine: Tensor) -> PreparedPair:
    """The backend's per-pair preparation (its ``prepare`` hook, else the pair as given)."""
    hook = getattr(backend, "prepare", None)
    if hook is not None:
        return hook(source, target, source_affine, target_affine)
    return PreparedPair(source, target, source_affine, target_affine)


def register_prepared(backend: RegistrationBackend, pair: PreparedPair, sources: Tensor) -> Tensor:
    """Maps ``(B, D, *target_shape)`` registering each of ``sources`` ``(B, C, *source_shape)`` to the pair's
    target (source voxel units); the backend's ``register_prepared`` hook, else ``register``."""
    hook = getattr(backend, "register_prepared", None)
    if hook is not None:
        return hook(pair, sources)
    targets = pair.target.expand(sources.shape[0], *pair.target.shape[1:])
    return backend.register(sources, targets, pair.source_affine, pair.target_affine)


def register_perturbed(backend: RegistrationBackend, pair: PreparedPair, matrices: Tensor) -> Tensor:
    """``psi_b = T_b o R(A o T_b, B)`` for voxel-space perturbation matrices ``T_b`` ``(B, D+1, D+1)`` of the
    source grid: each prediction for the perturbed source, composed back (source voxel units, target grid).

    The backend's ``register_perturbed`` hook (one interpolation of the source per sample), else: warp the
    source, :func:`register_prepared`, apply ``T_b`` (exact for matrices).
    """
    hook = getattr(backend, "register_perturbed", None)
    if hook is not None:
        return hook(pair, matrices)
    moved = T.warp_affine(pair.source, matrices, pair.source.shape[2:])
    return T.apply_affine(matrices, register_prepared(backend, pair, moved))


def register_warped(backend: RegistrationBackend, pair: PreparedPair, tau: DenseWarp) -> Tensor:
    """``phi'_b = R(A o tau_b, B)``: the predictions ``(B, D, *target_shape)`` (source voxel units) for the source
    warped by the dense perturbations ``tau`` (:class:`~equiqc.pipeline.perturbations.DenseWarp`: call it on
    source voxel positions, or ``tau.on_grid(matrix, shape)`` for the positions of a grid). Not composed back
    (that needs ``tau`` at the predictions).

    The backend's ``register_warped`` hook (the source sampled once, at ``tau`` of the network grid), else:
    the source warped on its own grid, then :func:`register_prepared`.
    """
    hook = getattr(backend, "register_warped", None)
    if hook is not None:
        return hook(pair, tau)
    eye = torch.eye(pair.source.dim() - 1, dtype=torch.float64)
    return register_prepared(backend, pair, T.warp(pair.source, tau.on_grid(eye, pair.source.shape[2:])))


@contextlib.contextmanager
def deterministic(backend: RegistrationBackend) -> Iterator[None]:
    """Run the block with the backend's randomness off (its ``deterministic`` hook), else unchanged."""
    hook = getattr(backend, "deterministic", None)
    with hook() if hook is not None else contextlib.nullcontext():
        yield


def check_prediction(phi: Tensor, batch: int, target_shape: tuple[int, ...]) -> Tensor:
    """Validate an adapter's output ``(batch, D, *target_shape)`` against the convention; returns ``phi``.

    Raises ``ValueError`` naming what is wrong (batch, channel count, spatial shape, non-finite values),
    so a broken adapter fails loudly instead of producing silently wrong statistics. Finiteness is checked
    on the sum of all coordinates (one reduction; any NaN or infinity makes it non-finite, and coordinates
    are far too small for the sum to overflow), then located only when it fails.
    """
    expected = (batch, len(target_shape), *target_shape)
    if tuple(phi.shape) != expected:
        raise ValueError(
            f"backend returned a map of shape {tuple(phi.shape)}; expected {expected} "
            "(batch, one channel per spatial axis, target grid)"
        )
    if not torch.isfinite(phi.sum()):
        bad = int((~torch.isfinite(phi)).sum())
        if bad:  # else only the sum overflowed: huge but finite coordinates, left to the field-of-view check
            raise ValueError(f"backend returned a map with {bad} non-finite coordinates")
    return phi
