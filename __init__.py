"""equiqc: transformation-equivariance uncertainty QC for pretrained image registration, on Dask.

This file is the ``equiqc`` package itself: pyproject.toml maps the repository root to ``equiqc`` so that the
science (``pipeline/``), the files (``storage/``) and the orchestration (``workflows/``) install as
``equiqc.pipeline``, ``equiqc.storage`` and ``equiqc.workflows`` while the folders stay at the root of the
repository. Nothing else is installed at top level.

``__version__`` comes from the installed distribution's metadata, which setuptools-scm derives from git at
build time (``0.1.devN+g<commit>``, ``.dYYYYMMDD`` for an uncommitted tree).

The public API is importable from here (``from equiqc import estimate_uncertainty, open_pair``): one pair in
Python (:func:`estimate_uncertainty` with a backend from :func:`load_backend`, images from :func:`load_volume`),
a whole cohort (:func:`run_cohort` with a :func:`make_config` configuration), and the results
(:func:`open_pair`, :func:`open_cohort_results`, :func:`read_report`). Each name is imported on first use, so
``import equiqc`` stays light (no torch, no Dask).
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("equiqc")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it (imported lazily, PEP 562)
_PUBLIC = {
    "estimate_uncertainty": "equiqc.pipeline.estimator",
    "EstimatorConfig": "equiqc.pipeline.estimator_config",
    "UncertaintyResult": "equiqc.pipeline.estimator",
    "PerturbationConfig": "equiqc.pipeline.perturbation_config",
    "RegistrationBackend": "equiqc.pipeline.backends.base",
    "load_backend": "equiqc.pipeline.backends.registry",
    "register_backend": "equiqc.pipeline.backends.registry",
    "load_volume": "equiqc.storage.nifti",
    "read_transform_map": "equiqc.storage.transform_files",
    "open_pair": "equiqc.storage.results",
    "open_cohort_results": "equiqc.storage.results",
    "read_report": "equiqc.storage.report",
    "make_config": "equiqc.workflows.config",
    "RunConfig": "equiqc.workflows.config",
    "run_cohort": "equiqc.workflows.run",
    "UserError": "equiqc.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'equiqc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
