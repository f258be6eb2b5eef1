"""Any torch module as a registration backend: Python modules, TorchScript files, importable factories.

``ModuleBackend`` wraps a module ``net(source, target) -> output`` (or a tuple whose ``output_index``-th
element is the output), with a declared :class:`~pipeline.backends.conventions.OutputConvention`, an
optional fixed input shape (images are resampled in index space, see :mod:`pipeline.backends.grids`) and
an intensity normalisation. That is enough for VoxelMorph-, TransMorph- and SynthMorph-style networks
to plug in without code changes::

    equiqc run cohort.csv --out out --model torchscript:vxm.pt --output-convention displacement/voxel/ij
    equiqc run cohort.csv --out out --model python:mypkg.models:make_net --input-shape 160 192 224

Trust: loading a TorchScript file or importing a Python factory runs that code with your permissions;
only use files and packages you trust (weights alone are loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.backends.conventions import OutputConvention
from pipeline.backends.grids import image_map_from_net, resample_to

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


class ModuleBackend:
    """Adapter for a module with a declared output convention (see module docstring)."""

    def __init__(self, net: nn.Module, name: str, convention: OutputConvention | None = None,
                 input_shape: Sequence[int] | None = None, align_corners: bool = True,
                 intensity: str | Callable[[Tensor], Tensor] = "percentile", output_index: int = 0,
                 device: str | torch.device = "cpu", mc_dropout: bool = False):
        self.name = name
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.convention = convention or OutputConvention()
        self.input_shape = tuple(input_shape) if input_shape else None
        self.align_corners = align_corners
        self.intensity = INTENSITY[intensity] if isinstance(intensity, str) else intensity
        self.output_index = output_index
        self.stochastic = False
        if mc_dropout:
            enable_mc_dropout(self.net, name)
            self.stochastic = True

    @torch.no_grad()
    def register(self, source: Tensor, target: Tensor, source_affine: Tensor | None = None,
                 target_affine: Tensor | None = None) -> Tensor:
        grid = self.input_shape or tuple(target.shape[2:])
        src = resample_to(self.intensity(source[:, :1].float()), grid, self.align_corners)
        tgt = resample_to(self.intensity(target[:, :1].float()), grid, self.align_corners)
        out = self.net(src, tgt)
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        phi_net = self.convention.to_voxel_map(out.float())
        return image_map_from_net(phi_net, source.shape[2:], target.shape[2:], self.align_corners)


def load_torchscript(path: str | Path, **kwargs) -> ModuleBackend:
    """A TorchScript file (``torch.jit.save``) as a backend; see :class:`ModuleBackend` for ``kwargs``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TorchScript model not found: {path}")
    device = kwargs.get("device", "cpu")
    return ModuleBackend(torch.jit.load(str(path), map_location=device), name=f"torchscript:{path.name}", **kwargs)


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
