"""equiqc's shipped default model: a compact diffeomorphic 3D U-Net and its adapter.

Network (``DefaultNet``): input the source and target resampled to the network grid ``NET_SHAPE``
(96 x 112 x 96 voxels, about 2 mm isotropic for an adult brain MRI), intensities scaled to [0, 1] by
their 99.5th percentile; a 5-level U-Net (16-32-32-32-32 channels) with 3D dropout in the decoder (for
MC-dropout) predicts a stationary velocity field at half resolution, integrated by scaling and squaring
and upsampled: a diffeomorphic map on the network grid (voxel units of the network grid).

Adapter (``load_default``): a :class:`~equiqc.pipeline.backends.module.ModuleBackend` that resamples each image
to the network grid in voxel-index space (first and last voxel centres aligned), runs the network, and
converts the map back to DESIGN's convention on the original target grid, in source voxel units:
``phi(y) = S_src^-1 phi_net(S_tgt y)`` with ``S`` the index scaling of each image onto the network grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.module import ModuleBackend, percentile_normalise

Tensor = torch.Tensor
NET_SHAPE = (96, 112, 96)
WEIGHTS = Path(__file__).with_name("default_weights.pt")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class DefaultNet(nn.Module):
    """U-Net predicting a velocity field; ``forward`` returns the map on the network grid (voxels)."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32, 32, 32), dropout: float = 0.1, steps: int = 6):
        super().__init__()
        c = tuple(channels)
        self.enc = nn.ModuleList([_block(2, c[0])] + [_block(c[i - 1], c[i], 2) for i in range(1, len(c))])
        # decode from the bottleneck up to half resolution, with skip connections
        self.dec = nn.ModuleList([_block(c[i + 1] + c[i], c[i]) for i in range(len(c) - 2, 0, -1)])
        self.drop = nn.Dropout3d(dropout)
        self.head = nn.Conv3d(c[1], 3, 3, 1, 1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)
        self.steps = steps

    def velocity(self, source: Tensor, target: Tensor) -> Tensor:
        x = torch.cat([source, target], 1)
        skips = []
        for layer in self.enc:
            x = layer(x)
            skips.append(x)
        x = skips.pop()
        for layer in self.dec:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = self.drop(layer(torch.cat([x, skip], 1)))
        return self.head(x)  # half resolution, in half-resolution voxels

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        return self.integrate(self.velocity(source, target), source.shape[2:])

    def integrate(self, v: Tensor, shape) -> Tensor:
        """Half-resolution velocity -> map on the full network grid (voxels)."""
        return T.displacement_to_map(T.resize_displacement(T.scaling_and_squaring(v, self.steps), shape))


def load_default(weights: str | Path | None = None, device: str | torch.device = "cpu",
                 mc_dropout: bool = False) -> ModuleBackend:
    """The shipped default model as a backend (see module docstring); ``weights`` overrides the shipped file."""
    path = Path(weights) if weights else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"default model weights not found at {path}; reinstall equiqc or pass "
                                "--weights PATH to a file written by docs/models/train_default.py")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = DefaultNet(**state.get("config", {}))
    net.load_state_dict(state["model"], strict=True)
    return ModuleBackend(net, "default", OutputConvention("map", "voxel", "ij"), input_shape=NET_SHAPE,
                         align_corners=True, intensity=percentile_normalise, device=device, mc_dropout=mc_dropout,
                         weights_path=path)
