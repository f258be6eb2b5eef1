"""Any torch module as a registration backend: Python modules, TorchScript files, importable factories.

``ModuleBackend`` wraps a module ``net(source, target) -> output`` (or a tuple whose ``output_index``-th
element is the output), with a declared :class:`~equiqc.pipeline.backends.conventions.OutputConvention`, an
optional fixed input shape (images are resampled in index space, see :mod:`equiqc.pipeline.backends.grids`),
an intensity normalisation, and the array layout the network expects
(:class:`~equiqc.pipeline.backends.layout.InputLayout`: ``RAS`` by default, equiqc's RAS+ array order;
e.g. ``SAR`` for a network trained on ITK arrays of RAS-stored files, ``LIA`` for FreeSurfer-conformed
data; ``input_shape`` is then given in the network's axis order). That is enough for VoxelMorph-,
TransMorph- and SynthMorph-style networks to plug in without code changes::

    equiqc run cohort.csv --out out --model torchscript:vxm.pt --output-convention displacement/voxel/ij
    equiqc run cohort.csv --out out --model python:mypkg.models:make_net --input-shape 160 192 224
    equiqc run cohort.csv --out out --model torchscript:net.pt --input-layout LIA

Trust: loading a TorchScript file or importing a Python factory runs that code with your permissions;
only use files and packages you trust (weights alone are loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from equiqc.pipeline import transforms as T
from equiqc.pipeline.backends.base import PreparedPair
from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.grids import index_matrix, resample_to
from equiqc.pipeline.backends.layout import InputLayout

if TYPE_CHECKING:
    from equiqc.pipeline.perturbations import DenseWarp

Tensor = torch.Tensor
DROPOUT_NAMES = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}


def percentile_normalise(x: Tensor, q: float = 0.995) -> Tensor:
    """Scale each image to [0, 1]: minimum (or 0) to its ``q`` quantile (of a subsample), clipped."""
    flat = x.flatten(1)
    sub = flat[:, :: max(1, flat.shape[1] // 100_000)]
    hi = torch.quantile(sub.float(), q, dim=1)
    lo = flat.amin(1).clamp_max(0)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return ((x - lo.view(shape)) / (hi - lo).clamp_min(1e-6).view(shape)).clamp(0, 1)


INTENSITY: dict[str, Callable[[Tensor], Tensor]] = {"percentile": percentile_normalise, "none": lambda x: x}


def enable_mc_dropout(module: nn.Module, name: str = "model") -> int:
    """Put the module in eval mode with its dropout layers active; returns how many there are.

    Raises ``ValueError`` when the model has no dropout (MC-dropout is then impossible).
    """
    module.eval()
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or getattr(m, "original_name", None) in DROPOUT_NAMES:
            m.train()
            count += 1
    if count == 0:
        raise ValueError(f"{name} has no dropout layers, so MC-dropout cannot be run on it; "
                         "use --method equivariance")
    return count


def parse_input_shape(shape: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """A fixed network input shape from a sequence of ints or ``"160 192 224"`` / ``"160,192,224"``; ``None`` keeps
    each target's own shape. Raises ``ValueError`` for anything but 2 or 3 positive integers."""
    if shape is None or (isinstance(shape, (list, tuple)) and not shape):
        return None
    parts = shape.replace(",", " ").split() if isinstance(shape, str) else list(shape)
    try:
        values = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape {shape!r}: expected 2 or 3 positive integers, e.g. 160 192 224") from None
    if len(values) not in (2, 3) or min(values) < 1 or any(isinstance(p, (bool, float)) for p in parts):
        raise ValueError(f"input_shape {shape!r}: expected 2 or 3 positive integers, e.g. 160 192 224")
    return values


@dataclass
class NetworkPair(PreparedPair):
    """A pair prepared for a network with an index-space input grid (see :meth:`ModuleBackend.prepare`).

    grid: the network's input shape (its layout's axis order); target_net: the target on it, normalised,
    ``(1, 1, *grid)``; net_to_source: homogeneous float64 matrix, network voxel -> RAS+ source voxel;
    target_base: ``(1, D, *target_shape)`` float32, the network-grid position of every RAS+ target voxel;
    target_layout_shape: the target's shape in the network's layout.
    """

    grid: tuple[int, ...] = ()
    target_net: Tensor | None = None
    net_to_source: Tensor | None = None
    target_base: Tensor | None = None
    target_layout_shape: tuple[int, ...] = ()


class ModuleBackend:
    """Adapter for a module with a declared output convention (see module docstring)."""

    def __init__(self, net: nn.Module, name: str, convention: OutputConvention | str | None = None,
                 input_shape: Sequence[int] | None = None, align_corners: bool = True,
                 intensity: str | Callable[[Tensor], Tensor] = "percentile", output_index: int = 0,
                 device: str | torch.device = "cpu", mc_dropout: bool = False,
                 weights_path: str | Path | None = None, layout: str | InputLayout = "RAS"):
        self.name = name
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.convention = OutputConvention.parse(convention) if isinstance(convention, str) else (
            convention or OutputConvention())
        self.input_shape = parse_input_shape(input_shape)
        self.align_corners = align_corners
        if isinstance(intensity, str) and intensity not in INTENSITY:
            raise ValueError(f"intensity {intensity!r}: choose one of {', '.join(INTENSITY)}")
        self.intensity = INTENSITY[intensity] if isinstance(intensity, str) else intensity
        if isinstance(output_index, bool) or not isinstance(output_index, int) or output_index < 0:
            raise ValueError(f"output_index must be an integer >= 0, got {output_index!r}")
        self.output_index = output_index
        self.weights_path = Path(weights_path) if weights_path else None
        self.layout = layout if isinstance(layout, InputLayout) else InputLayout(layout)
        self.stochastic = False
        self._target_cache: tuple | None = None  # (key, prepared target) of the last pair, see _prepared_target
        if mc_dropout:
            enable_mc_dropout(self.net, name)
            self.stochastic = True

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Dropout off inside the block (the network's plain forward), back on after it when MC-dropout is on."""
        dropout = [m for m in self.net.modules() if m.training]
        for m in dropout:
            m.eval()
        try:
            yield
        finally:
            for m in dropout:
                m.train()

    @torch.no_grad()
    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        return self.register_prepared(self.prepare(source[:1], target[:1], source_affine, target_affine), source)

    @torch.no_grad()
    def prepare(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                target_affine: Tensor | None = None) -> NetworkPair:
        """The target resampled onto the network grid and normalised, and the index matrices, once per pair."""
        d = source.dim() - 2
        src_shape = tuple(source.shape[2:])
        grid, target_net, target_base = self._prepared_target(target[:1, :1].float())
        # image (RAS+ voxel) -> network voxel: the layout's signed permutation, then the index scaling
        src_to_net = (index_matrix(self.layout.shape(src_shape), grid, self.align_corners)
                      @ self.layout.matrix(src_shape))
        return NetworkPair(
            source=source[:1], target=target[:1], source_affine=T.as_matrix(source_affine, d, device=source.device),
            target_affine=T.as_matrix(target_affine, d, device=source.device), grid=grid, target_net=target_net,
            net_to_source=torch.linalg.inv(src_to_net).to(source.device), target_base=target_base,
            target_layout_shape=self.layout.shape(tuple(target.shape[2:])))

    def _prepared_target(self, target: Tensor) -> tuple[tuple[int, ...], Tensor, Tensor]:
        """The network grid, the target on it (normalised) and the network position of every target voxel.

        Cohorts often register every subject to one template: the last target's preparation is kept, keyed by
        its shape, device and a hash of its voxels (blake2b, a few ms for a 2 mm volume), and reused.
        """
        key = (tuple(target.shape), str(target.device),
               hashlib.blake2b(target.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest())
        if self._target_cache is not None and self._target_cache[0] == key:
            return self._target_cache[1]
        tgt_shape = tuple(target.shape[2:])
        tgt_layout = self.layout.to_layout(target)
        grid = self.input_shape or tuple(tgt_layout.shape[2:])
        tgt_to_net = index_matrix(tgt_layout.shape[2:], grid, self.align_corners) @ self.layout.matrix(tgt_shape)
        prepared = (grid, self.intensity(resample_to(tgt_layout, grid, self.align_corners)),
                    T.affine_map(tgt_to_net.to(target.device), tgt_shape))
        self._target_cache = (key, prepared)
        return prepared

    @torch.no_grad()
    def register_prepared(self, pair: NetworkPair, sources: Tensor) -> Tensor:
        """Maps for a batch of sources ``(B, C, *source_shape)`` (RAS+) of the prepared pair."""
        x = resample_to(self.layout.to_layout(sources[:, :1].float()), pair.grid, self.align_corners)
        return self._predict(pair, x, pair.net_to_source)

    @torch.no_grad()
    def register_perturbed(self, pair: NetworkPair, matrices: Tensor) -> Tensor:
        """``T_b o R(A o T_b, B)``: the source sampled once at ``T_b`` of the network grid's image positions, and
        ``T_b`` applied in the same matrix as the network-to-image index change on the way back."""
        outer = matrices.to(pair.net_to_source) @ pair.net_to_source  # network voxel -> perturbed source voxel
        x = T.warp_affine(pair.source[:, :1].float(), outer, pair.grid)
        return self._predict(pair, x, outer)

    @torch.no_grad()
    def register_warped(self, pair: NetworkPair, tau: DenseWarp) -> Tensor:
        """``R(A o tau_b, B)`` for dense perturbations: the source sampled once at ``tau`` of the network grid's
        source positions, mapped back as :meth:`register_prepared` does."""
        x = T.warp(pair.source[:, :1].float(), tau.on_grid(pair.net_to_source, pair.grid))
        return self._predict(pair, x, pair.net_to_source)

    def _predict(self, pair: NetworkPair, x: Tensor, outer: Tensor) -> Tensor:
        """Run the network on sources ``x`` on its grid (raw intensities) and return ``outer o phi_net o S_tgt``:
        the displacement is interpolated onto the target grid and added to the cached base grid."""
        x = self.intensity(x)
        out = self.net(x, pair.target_net.expand(x.shape[0], *pair.target_net.shape[1:]))
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        u = T.map_to_displacement(self.convention.to_voxel_map(out.float()))  # network voxels
        u = self.layout.grid_to_ras(resample_to(u, pair.target_layout_shape, self.align_corners))
        return T.apply_affine(outer, u.add_(pair.target_base))


def load_torchscript(path: str | Path, **kwargs) -> ModuleBackend:
    """A TorchScript file (``torch.jit.save``) as a backend; see :class:`ModuleBackend` for ``kwargs``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript model not found: {path}")
    device = kwargs.get("device", "cpu")
    return ModuleBackend(torch.jit.load(str(path), map_location=device), name=f"torchscript:{path.name}",
                         weights_path=path, **kwargs)


def load_python_factory(spec: str, factory_options: dict | None = None, **kwargs):
    """``package.module:factory`` -> ``factory(**factory_options)``: a module (wrapped) or a ready backend."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"python model {spec!r}: expected package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"python model {spec!r}: cannot import ({exc})") from exc
    obj = factory(**(factory_options or {}))
    if hasattr(obj, "register") and hasattr(obj, "device"):
        return obj  # already a backend
    if not isinstance(obj, nn.Module):
        raise ValueError(f"python model {spec!r}: the factory returned {type(obj).__name__}, not a torch module")
    return ModuleBackend(obj, name=f"python:{spec}", **kwargs)
