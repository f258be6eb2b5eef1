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

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from equiqc.pipeline.backends.conventions import OutputConvention
from equiqc.pipeline.backends.grids import image_map_from_net, resample_to
from equiqc.pipeline.backends.layout import InputLayout

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
        if mc_dropout:
            enable_mc_dropout(self.net, name)
            self.stochastic = True

    @torch.no_grad()
    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        source_shape = tuple(source.shape[2:])
        source, target = self.layout.to_layout(source), self.layout.to_layout(target)  # RAS+ -> network layout
        grid = self.input_shape or tuple(target.shape[2:])
        src = resample_to(self.intensity(source[:, :1].float()), grid, self.align_corners)
        tgt = resample_to(self.intensity(target[:, :1].float()), grid, self.align_corners)
        out = self.net(src, tgt)
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        phi_net = self.convention.to_voxel_map(out.float())
        phi = image_map_from_net(phi_net, source.shape[2:], target.shape[2:], self.align_corners)
        return self.layout.map_to_ras(phi, source_shape)


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
