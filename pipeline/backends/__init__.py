"""Registration model adapters behind one protocol (:class:`equiqc.pipeline.backends.base.RegistrationBackend`)."""

from equiqc.pipeline.backends.base import RegistrationBackend, check_prediction

__all__ = ["RegistrationBackend", "check_prediction"]
