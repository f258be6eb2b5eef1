"""A classical baseline "model": affine registration by gradient descent on the image similarity.

It needs no weights and runs anywhere, so it serves as the model of the quick-start example and as a
reference backend. For each batch element it optimises a world-space (mm) affine correction ``W`` of the
grids' physical alignment (linear part about the target grid's centre), ``phi(y) = A_src^-1 W A_tgt y``,
minimising the mean squared difference of RMS-scaled intensities with Adam (learning rate decayed
linearly to 5 % at each level), coarse to fine. Its output follows DESIGN's map convention.

Optimisation is not exactly equivariant (finite iterations, interpolation, local minima), which is what
the estimator measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from equiqc.pipeline import transforms as T

Tensor = torch.Tensor


def _scale(x: Tensor) -> Tensor:
    """Divide each image by its RMS intensity; no centring, so a zero background stays zero and matches
    the zero padding of the warp outside the source's field of view."""
    return x / x.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-6).view(-1, *([1] * (x.dim() - 1)))


class AffineOptimisation:
    """Affine registration by Adam on MSE of RMS-scaled intensities (levels: coarse-to-fine downsampling)."""

    name = "affine-opt"
    stochastic = False
    input_shape = None

    def __init__(self, iterations: int = 80, levels: tuple[int, ...] = (2, 1), lr_linear: float = 0.01,
                 lr_translation_mm: float = 0.5, device: str | torch.device = "cpu"):
        self.iterations = iterations
        self.levels = levels
        self.lr = (lr_linear, lr_translation_mm)
        self.device = torch.device(device)

    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        d = source.dim() - 2
        a_src = T.as_matrix(source_affine, d, torch.float32, source.device)
        a_tgt = T.as_matrix(target_affine, d, torch.float32, source.device)
        with torch.inference_mode(False):
            return self._fit(source.clone(), target.clone(), a_src.clone(), a_tgt.clone())

    def _fit(self, source: Tensor, target: Tensor, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        d, b = source.dim() - 2, source.shape[0]
        src, tgt = _scale(source.float()), _scale(target.float())
        linear = torch.zeros(b, d, d, device=source.device, requires_grad=True)
        shift = torch.zeros(b, d, device=source.device, requires_grad=True)
        opt = torch.optim.Adam([{"params": [linear], "lr": self.lr[0]}, {"params": [shift], "lr": self.lr[1]}])
        eye = torch.eye(d, device=source.device)
        centre = T.grid_centre_mm(target.shape[2:], a_tgt)  # linear part acts about the target's centre

        def voxel_matrix(level: int) -> Tensor:
            # voxels of the level grid (blocks of `level` target voxels) -> full-resolution source voxels
            world = T.world_about_centre(eye + linear, shift, centre)
            down = T.matrix_from_parts(eye * level, torch.full((d,), (level - 1) / 2, device=source.device))
            return torch.linalg.inv(a_src) @ world @ a_tgt @ down

        pool = F.avg_pool3d if d == 3 else F.avg_pool2d
        with torch.enable_grad():
            for level in self.levels:
                tgt_l = pool(tgt, level) if level > 1 else tgt
                sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.05, total_iters=self.iterations)
                for _ in range(self.iterations):
                    opt.zero_grad()
                    moved = T.warp(src, T.affine_map(voxel_matrix(level), tgt_l.shape[2:]))
                    F.mse_loss(moved, tgt_l.expand_as(moved)).backward()
                    opt.step()
                    sched.step()
        with torch.no_grad():
            return T.affine_map(voxel_matrix(1).detach(), target.shape[2:])
