"""Registration model adapters behind one protocol (:class:`equiqc.pipeline.backends.base.RegistrationBackend`).

The names are loaded on first use, so the model registry and its per-model defaults
(:mod:`equiqc.pipeline.backends.registry`) are read without importing torch."""

__all__ = ["RegistrationBackend", "check_prediction"]


def __getattr__(name: str):
    if name in __all__:
        from equiqc.pipeline.backends import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
