"""MultiPropReg (``MultiPropReg==0.1.1`` on PyPI, MIT; Liu et al., "Learning Deformable Image Registration
from Optimization") as a backend: a real third-party pretrained brain-MRI model that works offline.

Weights: the package's ``models/pretrained_model_epoch400.ckpt``, loaded with
``torch.load(weights_only=True)`` into ``networks.DeformableNet(LossFunction_Registration(),
["conv_3x3"] * 6, ["conv_3x3"] * 6)`` with strict key matching (the package's own ``scripts/test.py`` loads
with ``strict=False`` into other classes and silently leaves tensors random).

Conventions: the network takes source and target at 160 x 192 x 224 voxels of 1 mm (skull-stripped,
intensities in [0, 1]) and returns ``(warped, flow, ...)`` with ``flow`` a voxel displacement, channel i =
array axis i. Its own ``SpatialTransformer`` (how the package warps images and segmentations, and how the
network was trained) normalises ``p = id + flow`` by ``n - 1`` but samples with ``grid_sample``'s default
``align_corners=False``, so the voxel it reads is ``p * n / (n - 1) - 0.5`` per axis, not ``p`` (up to half a
voxel apart at the grid's edges, 0 at its centre). The adapter returns those sampling positions
(:func:`package_sampling_positions`): the registration the package itself applies
(``tests/test_model_fidelity.py`` checks the map and the warped image against the package's forward).

Orientation: the network was trained in the array layout of the package's atlas, FreeSurfer's conformed
**LIA** layout (array axis 0 runs to the subject's left, axis 1 to inferior, axis 2 to anterior), although
the atlas files' headers hold the identity (which would mean RAS). :func:`atlas_affine` is the atlas's
true voxel-to-world matrix; ``tests/test_multipropreg.py::test_atlas_layout_is_lia`` shows it against the
MNI152 template (real RAS+ anatomy).

Any input grid: both images are resampled (trilinear) in *physical space* onto one axis-aligned 1 mm
LIA grid of the network's shape, centred on the target's field of view (for an input already on such a
grid, as the atlas, this is an exact copy); intensities are scaled to [0, 1] by each image's min and max.
The predicted map is brought back to DESIGN's convention on the original target grid:
``phi(y) = A_src^-1 N phi_net(N^-1 A_tgt y)`` with ``N`` the network grid's affine. Inputs should be
skull-stripped brain MRI like the package's atlas. The package's import-time and forward-time
UserWarnings are silenced locally (never globally).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from equiqc.errors import require
from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.module import enable_mc_dropout

Tensor = torch.Tensor
NET_SHAPE = (160, 192, 224)
# world (RAS, mm) direction of each network array axis, as columns: axis 0 -> left, 1 -> inferior, 2 -> anterior
NET_DIRECTIONS = ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0))


def package_dir() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MultiPropReg = require("MultiPropReg", "multipropreg", "model multipropreg")  # noqa: N806 (the package)
    return Path(list(MultiPropReg.__path__)[0])  # a namespace package: __file__ is None


def default_weights() -> Path:
    return package_dir() / "models" / "pretrained_model_epoch400.ckpt"


def atlas_paths() -> tuple[Path, Path]:
    """The package's atlas volume and its 14-label segmentation (160 x 192 x 224, 1 mm, identity affine)."""
    d = package_dir() / "data"
    return d / "atlas_vol.nii", d / "atlas_seg_14labels.nii"


def atlas_affine() -> np.ndarray:
    """The true voxel-to-world matrix (mm) of the package's atlas files: 1 mm LIA, grid centre at the origin.

    The files' own headers hold the identity, which is wrong: use this affine whenever the atlas is used as
    an image (the demo and tests do).
    """
    a = np.eye(4)
    a[:3, :3] = NET_DIRECTIONS
    a[:3, 3] = -a[:3, :3] @ ((np.array(NET_SHAPE) - 1) / 2)
    return a


def load_atlas() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(T1 float32 in [0, 1], 14-label segmentation int16, affine)`` of the package's adult atlas (LIA)."""
    import nibabel as nib

    vol_path, seg_path = atlas_paths()
    t1 = np.asarray(nib.load(str(vol_path)).dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(str(seg_path)).dataobj).astype(np.int16)
    return t1, seg, atlas_affine()


def build_network() -> nn.Module:
    package_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from MultiPropReg.torch.losses import LossFunction_Registration
        from MultiPropReg.torch.networks import DeformableNet

        return DeformableNet(LossFunction_Registration(), ["conv_3x3"] * 6, ["conv_3x3"] * 6)


def net_grid_affine(target_shape, target_affine: Tensor) -> Tensor:
    """1 mm LIA grid of the network's shape (voxel -> world, mm), centred on the target's field of view."""
    centre = T.grid_centre_mm(target_shape, target_affine.double())
    n = torch.eye(4, dtype=torch.float64, device=target_affine.device)
    n[:3, :3] = torch.tensor(NET_DIRECTIONS, dtype=torch.float64)
    half = torch.tensor([(s - 1) / 2 for s in NET_SHAPE], dtype=torch.float64, device=n.device)
    n[:3, 3] = centre - n[:3, :3] @ half
    return n


def package_sampling_positions(p: Tensor) -> Tensor:
    """``id + flow`` (net voxels) -> the voxel the package's SpatialTransformer actually samples: it normalises by
    ``n - 1`` and calls ``grid_sample`` with ``align_corners=False``, i.e. reads ``p * n / (n - 1) - 0.5``."""
    n = torch.tensor(p.shape[2:], dtype=p.dtype, device=p.device).view(1, -1, *([1] * (p.dim() - 2)))
    return p * n / (n - 1) - 0.5


def _minmax(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    lo, hi = flat.amin(1).view(-1, 1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


class MultiPropRegBackend:
    """Backend adapter (see module docstring)."""

    name = "multipropreg"
    stochastic = False
    input_shape = NET_SHAPE

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        path = Path(weights) if weights else default_weights()
        if not path.is_file():
            raise FileNotFoundError(f"MultiPropReg weights not found: {path}; pip install 'equiqc[multipropreg]' "
                                    "or pass --weights PATH/pretrained_model_epoch400.ckpt")
        self.device = torch.device(device)
        self.weights_path = path
        self.net = build_network()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)  # any missing or unexpected key is an error
        self.net.to(self.device).eval()

    @torch.no_grad()
    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        a_src = T.as_matrix(source_affine, 3, device=source.device)
        a_tgt = T.as_matrix(target_affine, 3, device=source.device)
        n = net_grid_affine(target.shape[2:], a_tgt)
        b = source.shape[0]
        src = T.warp(_minmax(source[:, :1].float()), T.affine_map(torch.linalg.inv(a_src) @ n, NET_SHAPE)
                     .expand(b, -1, *NET_SHAPE))
        tgt = T.warp(_minmax(target[:, :1].float()), T.affine_map(torch.linalg.inv(a_tgt) @ n, NET_SHAPE)
                     .expand(b, -1, *NET_SHAPE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flow = self.net(src, tgt)[1]
        phi_net = package_sampling_positions(T.displacement_to_map(flow.float()))  # net grid -> net grid (voxels)
        y_net = T.affine_map(torch.linalg.inv(n) @ a_tgt, target.shape[2:]).expand(b, -1, *target.shape[2:])
        return T.apply_affine(torch.linalg.inv(a_src) @ n, T.sample_map(phi_net, y_net))


def load_multipropreg(weights=None, device="cpu", mc_dropout=False) -> MultiPropRegBackend:
    backend = MultiPropRegBackend(weights, device)
    if mc_dropout:  # the shared check: this network has no dropout layer, so it raises with the reason
        enable_mc_dropout(backend.net, backend.name)
        backend.stochastic = True
    return backend
