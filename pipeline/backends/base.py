"""The protocol every registration model adapter implements.

An adapter wraps one model and speaks DESIGN's convention on both sides:

* inputs: ``source`` ``(B, C, *source_shape)`` and ``target`` ``(B, C, *target_shape)`` float tensors on
  ``device`` (the same target repeated along the batch), plus the voxel-to-world affines (mm) of the two
  grids as ``(D+1, D+1)`` float64 tensors, for adapters that must resample to a fixed physical input;
* output: maps ``(B, D, *target_shape)`` from the target grid into the source, in source voxel index
  units, channel ``d`` = array axis ``d`` (pull-back: ``warp(source, phi) ~ target``).

Each adapter converts its model's native convention (normalised coordinates, reversed axes, voxel
displacements, fixed input shape) to this one and back; the estimator never sees the native form.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

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


def check_prediction(phi: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """Validate an adapter's output against the convention; returns ``phi`` unchanged.

    Raises ``ValueError`` naming what is wrong (batch, channel count, spatial shape, non-finite values),
    so a broken adapter fails loudly instead of producing silently wrong statistics.
    """
    d = target.dim() - 2
    expected = (source.shape[0], d, *target.shape[2:])
    if tuple(phi.shape) != expected:
        raise ValueError(
            f"backend returned a map of shape {tuple(phi.shape)}; expected {expected} "
            "(batch, one channel per spatial axis, target grid)"
        )
    if not torch.isfinite(phi).all():
        raise ValueError("backend returned a map with non-finite coordinates")
    return phi
