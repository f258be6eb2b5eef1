"""The array layout a network expects: which anatomical direction each of its input array axes points to.

equiqc hands adapters volumes in closest-canonical RAS+ array order (axis 0 -> Right, 1 -> Anterior,
2 -> Superior). A network trained on another layout must be shown its own: uniGradICON's reference code
(``icon_registration.itk_wrapper.register_pair``) passes ``np.array(itk_image)``, the file's axes reversed,
which for an RAS-stored NIfTI is ``SAR``; FreeSurfer-conformed data (MultiPropReg) is ``LIA``.

A layout is a three-letter orientation code, one letter per array axis, as in nibabel's ``aff2axcodes``
(``R``/``L``, ``A``/``P``, ``S``/``I``, each pair once). :meth:`InputLayout.to_layout` permutes and flips a
RAS+ volume into that layout (exact: no interpolation); :meth:`InputLayout.map_to_ras` brings a map
predicted in the layout (on the target's layout grid, in the source's layout voxel indices) back to
equiqc's convention (RAS+ target grid, RAS+ source voxel indices). 2D images take only the identity
layout ``RAS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equiqc.pipeline import transforms as T

Tensor = torch.Tensor
_AXIS = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}


@dataclass(frozen=True)
class InputLayout:
    code: str = "RAS"

    def __post_init__(self) -> None:
        code = self.code.upper() if isinstance(self.code, str) else self.code
        if not isinstance(code, str) or len(code) != 3 or set(code) - set(_AXIS) or \
                sorted(_AXIS[c] for c in code) != [0, 1, 2]:
            raise ValueError(f"input layout {self.code!r}: expected three letters, one of R/L, A/P and S/I each "
                             "(e.g. RAS, LIA, SAR)")
        object.__setattr__(self, "code", code)

    @property
    def axes(self) -> tuple[int, ...]:
        """For each layout axis, the RAS+ axis it runs along."""
        return tuple(_AXIS[c] for c in self.code)

    @property
    def flips(self) -> tuple[bool, ...]:
        """For each layout axis, whether it runs against the RAS+ direction (L, P or I)."""
        return tuple(c not in "RAS" for c in self.code)

    @property
    def is_identity(self) -> bool:
        return self.code == "RAS"

    def to_layout(self, x: Tensor) -> Tensor:
        """``(B, C, X, Y, Z)`` in RAS+ array order -> the same voxels in this layout (permute, then flip)."""
        if self.is_identity:
            return x
        if x.dim() != 5:
            raise ValueError(f"input layout {self.code} needs 3D volumes, got {x.dim() - 2}D")
        x = x.permute(0, 1, *(2 + a for a in self.axes))
        flipped = [2 + i for i, f in enumerate(self.flips) if f]
        return x.flip(flipped) if flipped else x

    def matrix(self, shape_ras: tuple[int, ...]) -> Tensor:
        """Homogeneous float64 matrix: RAS+ voxel index of a grid of ``shape_ras`` -> its voxel index in this layout."""
        d = len(shape_ras)
        if self.is_identity:
            return torch.eye(d + 1, dtype=torch.float64)
        m = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        m[d, d] = 1.0
        for i, (axis, flip) in enumerate(zip(self.axes, self.flips, strict=True)):
            m[i, axis] = -1.0 if flip else 1.0
            m[i, d] = shape_ras[axis] - 1 if flip else 0.0
        return m

    def shape(self, shape_ras: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a RAS+ grid of ``shape_ras`` in this layout (2D grids: unchanged, their layout is RAS)."""
        return tuple(shape_ras) if self.is_identity else tuple(shape_ras[a] for a in self.axes)

    def grid_to_ras(self, x: Tensor) -> Tensor:
        """Spatial axes only: a field ``(B, C, *layout_shape)`` on a grid in this layout -> the same field on the
        RAS+ grid (channels untouched; inverse of :meth:`to_layout`)."""
        if self.is_identity:
            return x
        flipped = [2 + i for i, f in enumerate(self.flips) if f]
        if flipped:
            x = x.flip(flipped)
        inverse = [self.axes.index(d) for d in range(3)]
        return x.permute(0, 1, *(2 + i for i in inverse))

    def map_to_ras(self, phi: Tensor, source_shape_ras: tuple[int, ...]) -> Tensor:
        """A map on the target's layout grid in source layout voxel indices -> equiqc's convention: on the RAS+
        target grid, channel d = the RAS+ source voxel index along axis d."""
        if self.is_identity:
            return phi
        to_ras = torch.linalg.inv(self.matrix(source_shape_ras))  # exact: a signed permutation
        return T.apply_affine(to_ras, self.grid_to_ras(phi))
