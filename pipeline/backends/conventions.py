"""Native output conventions of registration networks, converted to voxel-index maps on the network grid.

A network's output is described by three choices (``OutputConvention``):

* ``kind``: ``"map"`` (absolute coordinates) or ``"displacement"`` (coordinates minus identity);
* ``units``: ``"voxel"`` (voxel index of the network grid), ``"unit"`` ([0, 1] from the first to the last
  voxel centre: ICON / uniGradICON) or ``"normalized"`` ([-1, 1] from the first to the last voxel centre:
  ``grid_sample`` with ``align_corners=True``);
* ``axes``: ``"ij"`` (channel d = array axis d) or ``"xy"`` (channels reversed, channel 0 = last array axis:
  ``grid_sample``'s order).

Examples: VoxelMorph outputs voxel displacements in array order (``displacement/voxel/ij``); a
``grid_sample`` grid is ``map/normalized/xy``; uniGradICON's ``phi_AB_vectorfield`` is ``map/unit/ij``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equiqc.pipeline import transforms as T

Tensor = torch.Tensor


@dataclass(frozen=True)
class OutputConvention:
    kind: str = "displacement"
    units: str = "voxel"
    axes: str = "ij"

    def __post_init__(self) -> None:
        for name, allowed in (("kind", ("map", "displacement")), ("units", ("voxel", "unit", "normalized")),
                              ("axes", ("ij", "xy"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"output convention {name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def parse(cls, text: str) -> OutputConvention:
        """From ``"kind/units/axes"``, e.g. ``"displacement/voxel/ij"``."""
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"output convention {text!r}: expected kind/units/axes, e.g. displacement/voxel/ij")
        return cls(*parts)

    def to_voxel_map(self, out: Tensor) -> Tensor:
        """Native output ``(B, D, *net_shape)`` -> map in network voxel indices, array axis order."""
        shape = out.shape[2:]
        if self.axes == "xy":
            out = out.flip(1)
        scale = torch.tensor([max(n - 1, 1) for n in shape], dtype=out.dtype, device=out.device)
        scale = scale.view(1, -1, *([1] * len(shape)))
        if self.units == "unit":
            out = out * scale
        elif self.units == "normalized":
            out = (out + 1) / 2 * scale if self.kind == "map" else out / 2 * scale
        return T.displacement_to_map(out) if self.kind == "displacement" else out

    def from_voxel_map(self, phi: Tensor) -> Tensor:
        """Inverse of :meth:`to_voxel_map` (used by tests and by adapters that feed maps back)."""
        shape = phi.shape[2:]
        out = T.map_to_displacement(phi) if self.kind == "displacement" else phi
        scale = torch.tensor([max(n - 1, 1) for n in shape], dtype=phi.dtype, device=phi.device)
        scale = scale.view(1, -1, *([1] * len(shape)))
        if self.units == "unit":
            out = out / scale
        elif self.units == "normalized":
            out = out / scale * 2 - 1 if self.kind == "map" else out / scale * 2
        return out.flip(1) if self.axes == "xy" else out
