"""Perturbation families and their magnitudes: the one place that names them (no torch import, so the CLI
can list them instantly). The samplers that draw them live in :mod:`equiqc.pipeline.perturbations`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KINDS = ("translation", "rigid", "affine", "scale", "shear", "diffeomorphic")
# "scale" and "shear" isolate one part of "affine" each (no rotation, no translation), to see which part of a
# family a model undoes.
# "none": K identity perturbations, for MC-dropout (the spread then comes from the model's own randomness).
ALL_KINDS = KINDS + ("none",)


@dataclass(frozen=True)
class PerturbationConfig:
    """Perturbation family and its magnitudes (physical units)."""

    kind: str = "rigid"
    max_translation_mm: float = 4.0
    max_rotation_deg: float = 4.0
    max_log_scale: float = 0.04
    max_shear: float = 0.04
    velocity_std_mm: float = 1.5
    control_spacing_mm: float = 24.0

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise ValueError(f"unknown perturbation kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name, value in asdict(self).items():
            if name == "kind":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"perturbation option {name} must be a finite number >= 0, got {value!r}")
        if self.control_spacing_mm <= 0:
            raise ValueError("perturbation option control_spacing_mm must be > 0")

    @property
    def is_affine(self) -> bool:
        return self.kind != "diffeomorphic"

    def to_dict(self) -> dict:
        return asdict(self)
