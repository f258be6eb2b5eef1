"""Registration model adapters behind one protocol (:class:`pipeline.backends.base.RegistrationBackend`)."""

from pipeline.backends.base import RegistrationBackend, check_prediction

__all__ = ["RegistrationBackend", "check_prediction"]
