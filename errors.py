"""The one base class for errors a user can cause and fix (``equiqc.errors.UserError``).

The CLI prints a ``UserError`` as one line (``equiqc: <message>``) and exits 2; ``--debug`` adds the
traceback. Every other exception is an internal error and keeps its traceback. Subclasses live next to the
code that raises them (``ConfigError``, ``ManifestError``, ``VolumeError``, ``RunLocked``); their message
names the input and what to do.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or environment; the message says what to fix."""
