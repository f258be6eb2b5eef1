"""Bringing images onto a network's fixed grid and its maps back (index space, 3D or 2D).

A network with a fixed input shape sees each image resampled in voxel-index space, covering the same field
of view. Two index correspondences are in use:

* ``align_corners=True``: the centres of the first and last voxels coincide,
  ``i_net = i_img * (n_net - 1) / (n_img - 1)`` (equiqc's default model);
* ``align_corners=False``: the outer edges coincide (``F.interpolate``'s default, and what
  icon_registration's ITK wrapper does for uniGradICON), ``i_net = (i_img + 0.5) * n_net / n_img - 0.5``.

:class:`~equiqc.pipeline.backends.module.ModuleBackend` turns a map on the network grid (network voxel units,
target -> source) into DESIGN's map on the original target grid in original source voxels,
``phi = M_src^-1 o phi_net o M_tgt``, by interpolating the network's displacement onto the target grid (the
same index correspondence as ``resample_to``) and adding the cached network positions ``M_tgt y``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def index_matrix(image_shape: Sequence[int], net_shape: Sequence[int], align_corners: bool,
                 device=None) -> Tensor:
    """Homogeneous float64 matrix: image voxel index -> network voxel index."""
    d = len(image_shape)
    m = torch.eye(d + 1, dtype=torch.float64, device=device)
    for i, (n, k) in enumerate(zip(image_shape, net_shape, strict=True)):
        if align_corners:
            m[i, i] = (k - 1) / max(n - 1, 1)
        else:
            m[i, i] = k / n
            m[i, d] = 0.5 * k / n - 0.5
    return m


def resample_to(x: Tensor, shape: Sequence[int], align_corners: bool) -> Tensor:
    """Resample ``(B, C, *spatial)`` onto ``shape`` (bi/trilinear); unchanged if already that shape."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=align_corners)
