"""The one base class for errors a user can cause and fix (``equiqc.errors.UserError``).

The CLI prints a ``UserError`` as one line (``equiqc: <message>``) and exits 2; ``--debug`` adds the
traceback. Every other exception is an internal error and keeps its traceback. Subclasses live next to the
code that raises them (``ConfigError``, ``ManifestError``, ``VolumeError``, ``RunLocked``); their message
names the input and what to do.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or environment; the message says what to fix."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names what needs it and the extra to install."""


def require(module: str, extra: str | None, purpose: str, install: str | None = None,
            error: type[Exception] = MissingExtra):
    """Import the optional dependency ``module``, or raise ``error`` with equiqc's one message for a missing extra:
    ``<purpose> needs <module>: pip install 'equiqc[<extra>]'`` (``install``: another command, for packages no
    extra can hold). ``error`` lets a caller keep its own error class (a pair's VolumeError, a ConfigError)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        how = install or f"pip install 'equiqc[{extra}]'"
        raise error(f"{purpose} needs {module}: {how}") from None
