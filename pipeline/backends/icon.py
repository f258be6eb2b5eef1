"""uniGradICON and multiGradICON (the ``unigradicon`` / ``icon_registration`` packages) as backends.

Their conventions, as the packages implement them (icon_registration 1.1.x, unigradicon 1.0.x):

* input: both images resampled to 175^3 in index space with ``align_corners=False`` (what
  ``icon_registration.itk_wrapper.register_pair`` does), intensities in [0, 1] by modality:
  CT clipped to [-1000, 1000] HU, MRI clipped to [min, 99th percentile] (``unigradicon.preprocess``);
* array order: ``register_pair`` passes ``np.array(itk_image)``, the file's storage axes *reversed*: for an
  RAS-stored NIfTI the network sees axes (S, A, R). equiqc first reorients every image to RAS+ (so its result
  does not depend on how a file is stored) and then hands the network that same ``SAR`` layout
  (:data:`REFERENCE_LAYOUT`, :mod:`equiqc.pipeline.backends.layout`): for RAS-stored files the prediction
  equals the reference's (``tests/test_model_fidelity.py``); for other storage orders the reference itself
  changes with the storage (it lines images up by array index), equiqc does not;
* output: ``phi_AB_vectorfield`` on B's (target) grid, coordinates of A (source) in [0, 1] units
  (0 = first voxel centre, 1 = last), channel d = array axis d: ``map/unit/ij``.

equiqc never downloads: weights are a local file given with ``--weights`` (``Step_2_final.trch`` from the
uniGradICON or multiGradICON GitHub release), loaded with ``torch.load(weights_only=True)`` into the
registration network with strict key matching. Install the packages without their torchvision pin:
``pip install --no-deps unigradicon icon_registration && pip install itk footsteps tqdm blosc pyyaml matplotlib``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from equiqc.errors import require
from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.module import ModuleBackend

Tensor = torch.Tensor
ICON_SHAPE = (175, 175, 175)
# What `register_pair` hands the network for an RAS-stored NIfTI: np.array(itk_image), the file's axes reversed.
REFERENCE_LAYOUT = "SAR"
RELEASES = {
    "unigradicon": "https://github.com/uncbiag/uniGradICON/releases/download/unigradicon_weights/Step_2_final.trch",
    "multigradicon": "https://github.com/uncbiag/uniGradICON/releases/download/multigradicon_weights/Step_2_final.trch",
}
INSTALL = ("pip install --no-deps unigradicon icon_registration && "
           "pip install itk footsteps tqdm blosc pyyaml matplotlib")


def icon_normalise(modality: str):
    """The packages' intensity preprocessing as a batched tensor function (``unigradicon.preprocess``)."""
    if modality == "ct":
        return lambda x: ((x.clamp(-1000, 1000) + 1000) / 2000)
    if modality != "mri":
        raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")

    def mri(x: Tensor) -> Tensor:
        flat = x.flatten(1)
        sub = flat[:, :: max(1, flat.shape[1] // 1_000_000)]
        lo, hi = flat.amin(1), torch.quantile(sub.float(), 0.99, dim=1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = lo.view(shape), hi.view(shape)
        return (x.clamp(min=lo, max=hi) - lo) / (hi - lo).clamp_min(1e-6)

    return mri


class IconNet(nn.Module):
    """``regis_net(A, B)`` evaluated on the identity map: the vector field only, without ICON's losses."""

    def __init__(self, icon_net: nn.Module):
        super().__init__()
        self.icon = icon_net

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        phi = self.icon.regis_net(source, target)
        return phi(self.icon.identity_map.expand(source.shape[0], *self.icon.identity_map.shape[1:]))


def build_network(input_shape: Sequence[int] = ICON_SHAPE) -> nn.Module:
    """The uniGradICON/multiGradICON architecture (both are the same network) with random weights."""
    unigradicon = require("unigradicon", None, "model unigradicon/multigradicon", install=INSTALL)
    return unigradicon.make_network([1, 1, *input_shape], include_last_step=True)


def load_icon(kind: str = "unigradicon", weights: str | Path | None = None, device: str | torch.device = "cpu",
              modality: str = "mri", input_shape: Sequence[int] = ICON_SHAPE, random_weights: bool = False,
              mc_dropout: bool = False, layout: str = REFERENCE_LAYOUT) -> ModuleBackend:
    """uniGradICON/multiGradICON backend. ``random_weights`` is for tests of shapes and conventions only."""
    if kind not in RELEASES:
        raise ValueError(f"unknown ICON model {kind!r}; choose unigradicon or multigradicon")
    if not random_weights:
        if weights is None or not Path(weights).is_file():
            where = weights or "(none given)"
            raise FileNotFoundError(
                f"{kind} weights not found: {where}. equiqc does not download; fetch Step_2_final.trch from "
                f"{RELEASES[kind]} on a machine with internet access and pass --weights PATH/Step_2_final.trch")
    net = build_network(input_shape)
    if not random_weights:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        net.regis_net.load_state_dict(state, strict=True)
    return ModuleBackend(IconNet(net), kind, OutputConvention("map", "unit", "ij"), input_shape=input_shape,
                         align_corners=False, intensity=icon_normalise(modality), device=device,
                         mc_dropout=mc_dropout, weights_path=None if random_weights else weights, layout=layout)
