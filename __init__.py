"""equiqc: transformation-equivariance uncertainty QC for pretrained image registration, on Dask.

This file is the ``equiqc`` package itself: pyproject.toml maps the repository root to ``equiqc`` so that the
science (``pipeline/``), the files (``storage/``) and the orchestration (``workflows/``) install as
``equiqc.pipeline``, ``equiqc.storage`` and ``equiqc.workflows`` while the folders stay at the root of the
repository. Nothing else is installed at top level.

``__version__`` comes from the installed distribution's metadata, which setuptools-scm derives from git at
build time (``0.1.devN+g<commit>``, ``.dYYYYMMDD`` for an uncommitted tree).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("equiqc")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
