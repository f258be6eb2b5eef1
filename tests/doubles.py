"""Test doubles for the backend protocol: registration "models" with an exactly known answer.

The images are *coordinate images*: the source's channels hold its own voxel coordinates (one channel
per axis) plus a channel of ones marking the field of view, so ``A o tau`` holds ``tau`` itself. The
target holds ``phi_AB`` (the source coordinates each target voxel corresponds to). A solver that only
reads the pixels can then register exactly: ``phi' = (A')^-1 o B``. That makes it perfectly equivariant,
and error of any known law can be injected on top of it.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch

from equiqc.pipeline import transforms as T

Tensor = torch.Tensor
# The device the test doubles (and so the estimator) run on: EQUIQC_TEST_DEVICE=cuda runs the same tests on a GPU.
TEST_DEVICE = os.environ.get("EQUIQC_TEST_DEVICE", "cpu")


def coordinate_source(shape) -> Tensor:
    """``(1, D+1, *shape)``: voxel coordinates of the grid and a ones channel."""
    grid = T.identity_grid(shape, torch.float32)
    return torch.cat([grid, torch.ones_like(grid[:, :1])], 1)


def coordinate_target(phi_ab: Tensor, source_shape) -> Tensor:
    """``(1, D+1, *target)``: the true map's coordinates and a mask of where it lands inside the source."""
    inside = T.inside_grid(phi_ab, source_shape).to(phi_ab.dtype)
    return torch.cat([phi_ab, inside[:, None]], 1).float()


class ExactSolver:
    """Reads ``tau`` from the perturbed coordinate image and returns ``tau^-1 o phi_AB`` exactly.

    ``mode="affine"``: fits an affine to the valid voxels of ``A'`` (exact for affine ``tau``).
    ``mode="dense"``: inverts ``A'`` pointwise by fixed-point iteration with linear interpolation (for
    smooth, small non-affine ``tau``; exact up to interpolation error).
    """

    name = "exact"
    stochastic = False
    input_shape = None

    def __init__(self, mode: str = "affine", device: str = TEST_DEVICE, iterations: int = 30):
        self.mode = mode
        self.device = torch.device(device)
        self.iterations = iterations
        self.calls = 0
        self.batch_sizes: list[int] = []

    def solve(self, source: Tensor, target: Tensor) -> Tensor:
        d = source.dim() - 2
        coords_src, ones = source[:, :d].double(), source[:, d]
        want = target[:, :d].double()
        if self.mode == "affine":
            out = []
            for b in range(source.shape[0]):
                valid = ones[b] > 1 - 1e-6
                x = T.identity_grid(source.shape[2:], torch.float64, source.device)[0][:, valid].T
                y = coords_src[b][:, valid].T
                design = torch.cat([x, torch.ones_like(x[:, :1])], 1)
                sol = torch.linalg.lstsq(design, y).solution  # (D+1, D): y = x @ L^T + t
                m = T.matrix_from_parts(sol[:d].T, sol[d])
                out.append(T.apply_affine(T.invert_affine(m), want[b : b + 1]))
            return torch.cat(out).float()
        x = want.clone()
        for _ in range(self.iterations):
            x = x + (want - T.warp(coords_src, x, padding="border"))
        return x.float()

    def register(self, source, target, source_affine=None, target_affine=None) -> Tensor:
        self.calls += 1
        self.batch_sizes.append(source.shape[0])
        return self.solve(source, target)


class NoisySolver(ExactSolver):
    """Exact solver plus i.i.d. Gaussian error per voxel with covariance ``sigma_mm2`` (mm^2, world axes;
    ``None`` for no noise, which makes the model deterministic).

    ``bias_per_translation``: adds ``alpha * t`` to the prediction, where ``t`` is the displacement of
    ``tau`` at the grid centre (voxel units): a bias that depends on the perturbation.
    """

    stochastic = True

    def __init__(self, sigma_mm2: np.ndarray | None, source_affine: np.ndarray, mode: str = "affine",
                 bias_per_translation: float = 0.0, seed: int | None = 0):
        super().__init__(mode)
        self.stochastic = sigma_mm2 is not None
        self.chol_vox = None
        if sigma_mm2 is not None:
            d = sigma_mm2.shape[0]
            lin = np.asarray(source_affine, dtype=np.float64)[:d, :d]
            self.chol_vox = torch.as_tensor(np.linalg.inv(lin) @ np.linalg.cholesky(sigma_mm2))
        self.alpha = bias_per_translation
        # seed=None: draw from torch's global RNG, like dropout does (the estimator seeds it per pair).
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def register(self, source, target, source_affine=None, target_affine=None) -> Tensor:
        phi = super().register(source, target).double()
        d = phi.shape[1]
        if self.chol_vox is not None:
            if self.generator is None:  # torch's global RNG on the model's device, as dropout uses it
                z = torch.randn(phi.shape, dtype=torch.float64, device=phi.device)
            else:
                z = torch.randn(phi.shape, generator=self.generator, dtype=torch.float64).to(phi.device)
            phi = phi + torch.einsum("ij,bj...->bi...", self.chol_vox.to(phi.device), z)
        if self.alpha:
            centre = tuple(n // 2 for n in source.shape[2:])
            t = source[(slice(None), slice(0, d), *centre)].double() - torch.tensor(centre, dtype=torch.float64,
                                                                                       device=source.device)
            phi = phi + self.alpha * t.view(-1, d, *([1] * d))
        return phi.float()


class ZeroDisplacement(torch.nn.Module):
    """A near-free network: zero displacement (the identity map) on whatever grid it is given. As
    ``--model python:doubles:ZeroDisplacement`` (with ``tests/`` on PYTHONPATH) it makes a cohort run measure the
    pipeline's own cost."""

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        return torch.zeros(source.shape[0], source.dim() - 2, *target.shape[2:], dtype=source.dtype)


class SlowZeroDisplacement(ZeroDisplacement):
    """:class:`ZeroDisplacement` whose every forward takes 40 ms (sleeping, as a GPU kernel would leave the CPU free):
    long estimation tasks against which a run's other tasks can be seen to overlap. ``most_at_once``: the most
    forwards this process has run at the same time (a worker's own count, free of the scheduler's clock)."""

    _lock = threading.Lock()
    running = 0
    most_at_once = 0

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        cls = SlowZeroDisplacement
        with cls._lock:
            cls.running += 1
            cls.most_at_once = max(cls.most_at_once, cls.running)
        try:
            time.sleep(0.04)
            return super().forward(source, target)
        finally:
            with cls._lock:
                cls.running -= 1


class Exploding(torch.nn.Module):
    """A network whose forward always fails (``--model python:doubles:Exploding``): every estimation raises."""

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        raise RuntimeError("the network exploded on purpose")


class IntensityDisplacement(torch.nn.Module):
    """A network whose displacement (network voxels) is a fixed linear function of the two images' intensities:
    ``u_c = gain_c * (source - target)``. Smooth images make any error in an adapter's grids or matrices show up
    as voxels, while interpolating the source once or twice differs only by interpolation error."""

    def __init__(self, gains=(2.0, -1.5, 1.0)):
        super().__init__()
        self.register_buffer("gains", torch.tensor(gains))

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        d = source.dim() - 2
        return self.gains[:d].view(1, d, *([1] * d)) * (source - target)


def smooth_blob(shape, centre_shift=0.0) -> Tensor:
    """``(1, 1, *shape)``: a Gaussian blob (intensities 0-1, about 0 at the edges), off-centre (no axis symmetric)."""
    grid = T.identity_grid(shape, torch.float64)[0]
    centre = torch.tensor([0.45 * n + centre_shift for n in shape], dtype=torch.float64).view(-1, *([1] * len(shape)))
    width = torch.tensor([0.2 * n for n in shape], dtype=torch.float64).view(-1, *([1] * len(shape)))
    return torch.exp(-(((grid - centre) / width) ** 2).sum(0) / 2)[None, None].float()


class OutOfMemoryAbove:
    """Wraps a backend; raises ``torch.OutOfMemoryError`` for calls of more than ``limit`` samples (as a GPU would)."""

    def __init__(self, backend, limit: int):
        self.backend, self.limit = backend, limit
        self.name, self.device, self.stochastic, self.input_shape = "oom", backend.device, False, None
        self.batch_sizes: list[int] = []

    def register(self, source, target, source_affine=None, target_affine=None) -> Tensor:
        self.batch_sizes.append(source.shape[0])
        if source.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"{source.shape[0]} samples do not fit")
        return self.backend.register(source, target, source_affine, target_affine)
