"""One place where backends are found by name.

Built in: ``default`` (the shipped network), ``affine-opt`` (classical affine baseline), ``ants`` (ANTs
registration, extra ``equiqc[ants]``), ``unigradicon``,
``multigradicon``, ``multipropreg`` (extra ``equiqc[multipropreg]``), ``torchscript:PATH`` and
``python:package.module:factory``. Other packages add backends without editing equiqc through the
entry-point group ``equiqc.backends``: an entry point ``name = package.module:factory`` makes
``--model name`` call ``factory(weights=..., device=..., mc_dropout=..., **options)``, which returns an
object implementing :class:`~equiqc.pipeline.backends.base.RegistrationBackend`. In-process,
:func:`register_backend` does the same.

Each model may recommend run options (:func:`model_defaults`: its perturbation family, K) and name the atlas its
demo and calibration cohorts are built from (:func:`model_atlas`); a run's config file and flags override them.
This module imports torch only when a backend is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from equiqc.pipeline.backends.base import RegistrationBackend

__all__ = ["load_backend", "register_backend", "available", "model_defaults", "model_atlas", "ENTRY_POINT_GROUP"]

Factory = Callable[..., "RegistrationBackend"]
_REGISTRY: dict[str, Factory] = {}
ENTRY_POINT_GROUP = "equiqc.backends"

# Run options a model recommends (applied under the config file and flags).
# MultiPropReg recovers only part of a rigid motion (it was trained on affinely pre-aligned brains), so rigid
# or translation perturbations mostly measure that shortfall (about the same in every pair; rigid: ~5 mm std
# everywhere in the demo) and their test-time mean is worse than the prediction; it does undo smooth local
# perturbations (test-time mean = prediction), the family its equivariance covers (docs/validation.md).
# ANTs: rigid perturbations reach ANTs exactly (as a change of the source's header, no resampling) and its
# registrations are seeded; K = 8 (each perturbed registration is a whole ANTs run; docs/models/ants.md).
_DEFAULTS: dict[str, dict] = {"multipropreg": {"perturbation": "diffeomorphic"},
                              "ants": {"perturbation": "rigid", "samples": 8}}
# The atlas a model's demo and calibration cohorts are built from: "mni" (MNI152 2009, 2 mm) unless the model was
# trained on its own atlas's grid and intensities (MultiPropReg: its adult atlas, FreeSurfer-conformed).
_ATLASES: dict[str, str] = {"multipropreg": "multipropreg"}


def register_backend(name: str, factory: Factory, defaults: dict | None = None, atlas: str | None = None) -> None:
    """Make ``--model name`` use ``factory(weights=, device=, mc_dropout=, **options)``; ``defaults``: the run
    options it recommends (e.g. ``{"perturbation": "diffeomorphic"}``), ``atlas``: ``"mni"`` or
    ``"multipropreg"`` for its demo and calibration cohorts."""
    _REGISTRY[name] = factory
    if defaults is not None:
        _DEFAULTS[name] = dict(defaults)
    if atlas is not None:
        _ATLASES[name] = atlas


def model_defaults(name: str) -> MappingProxyType:
    """The run options model ``name`` recommends (read-only; empty for most models)."""
    return MappingProxyType(_DEFAULTS.get(name, {}))


def model_atlas(name: str) -> str:
    """The atlas of model ``name``'s demo and calibration cohorts: ``"mni"`` or ``"multipropreg"``."""
    return _ATLASES.get(name, "mni")


def _builtin(name: str) -> Factory | None:
    if name == "default":
        from equiqc.pipeline.backends.default_net import load_default

        def default(weights=None, device="cpu", mc_dropout=False, **options):
            _no_options("default", options)
            return load_default(weights, device, mc_dropout)

        return default
    if name == "affine-opt":
        from equiqc.pipeline.backends.affine_opt import AffineOptimisation

        def affine(weights=None, device="cpu", mc_dropout=False, **options):
            if mc_dropout:
                raise ValueError("affine-opt has no dropout layers, so MC-dropout cannot be run on it")
            return AffineOptimisation(device=device, **options)

        return affine
    if name == "multipropreg":
        from equiqc.pipeline.backends.multipropreg import load_multipropreg

        def multipropreg(weights=None, device="cpu", mc_dropout=False, **options):
            _no_options("multipropreg", options)
            return load_multipropreg(weights, device, mc_dropout)

        return multipropreg
    if name == "ants":
        from equiqc.pipeline.backends.ants import load_ants

        return load_ants
    if name in ("unigradicon", "multigradicon"):
        from equiqc.pipeline.backends.icon import load_icon

        return lambda weights=None, device="cpu", mc_dropout=False, **o: load_icon(
            name, weights, device, mc_dropout=mc_dropout, **o)
    return None


def _no_options(name: str, options: dict) -> None:
    """Built-in models whose network is fixed take no model options: refuse them rather than ignore them."""
    if options:
        raise ValueError(f"model {name} takes no model options (got {', '.join(sorted(options))}); its input "
                         "grid, layout and output convention are fixed (see docs/models/)")


def available() -> list[str]:
    """Names usable with ``--model`` (besides the ``torchscript:`` and ``python:`` prefixes)."""
    names = {"default", "affine-opt", "ants", "unigradicon", "multigradicon", "multipropreg", *_REGISTRY}
    names |= {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def load_backend(spec: str, weights: str | None = None, device: str = "cpu", mc_dropout: bool = False,
                 **options) -> RegistrationBackend:
    """Build the backend named by ``spec`` on ``device``; ``options`` go to its factory."""
    if spec.startswith("torchscript:"):
        from equiqc.pipeline.backends.module import load_torchscript

        return load_torchscript(spec.split(":", 1)[1], device=device, mc_dropout=mc_dropout, **options)
    if spec.startswith("python:"):
        from equiqc.pipeline.backends.module import load_python_factory

        return load_python_factory(spec.split(":", 1)[1], device=device, mc_dropout=mc_dropout, **options)
    factory = _REGISTRY.get(spec) or _builtin(spec)
    if factory is None:
        eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if spec in eps:
            factory = eps[spec].load()
    if factory is None:
        raise ValueError(f"unknown model {spec!r}; choose one of {', '.join(available())}, "
                         "torchscript:PATH or python:package.module:factory")
    return factory(weights=weights, device=device, mc_dropout=mc_dropout, **options)
