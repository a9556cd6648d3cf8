"""The settings of the steps that join several detectors (ensembles/): the cascade's and the fusion's.

Written by ensembles/ into each step's config.pbtxt parameter `config` like backends.common.settings; a missing,
unknown or invalid field is a SettingsError naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backends.common.settings import JsonSettings
from backends.errors import SettingsError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


@dataclass(frozen=True)
class CascadeSettings(JsonSettings):
    """Stages in order (the models a BLS request goes to, and the stage names reported per image): a stage's answer
    is kept when its best score reaches min_confidence; the last stage's answer is always kept."""

    stages: tuple[str, ...]
    stage_names: tuple[str, ...]
    min_confidence: float

    def __post_init__(self) -> None:
        stages, names = tuple(self.stages), tuple(self.stage_names)
        _require(len(stages) >= 2 and all(isinstance(s, str) and s for s in stages),
                 f"cascade stages must name at least two models, got {self.stages!r}")
        _require(len(names) == len(stages) and all(isinstance(s, str) and s for s in names),
                 f"cascade stage_names must name each of the {len(stages)} stages, got {self.stage_names!r}")
        _require(_fraction(self.min_confidence), f"cascade min_confidence must be in [0, 1], got {self.min_confidence!r}")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "stage_names", names)


@dataclass(frozen=True)
class FusionSettings(JsonSettings):
    """Weighted Boxes Fusion of the detections of several models (one weight per model, in input order)."""

    weights: tuple[float, ...]
    iou: float
    skip_score: float
    max_detections: int
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        weights = tuple(self.weights) if isinstance(self.weights, (list, tuple)) else ()
        _require(len(weights) >= 2 and all(isinstance(w, (int, float)) and w > 0 for w in weights),
                 f"fusion weights must be at least two positive numbers, got {self.weights!r}")
        _require(_fraction(self.iou) and self.iou > 0, f"fusion iou must be in (0, 1], got {self.iou!r}")
        _require(_fraction(self.skip_score) and self.skip_score < 1, f"fusion skip_score must be in [0, 1), got {self.skip_score!r}")
        _require(isinstance(self.max_detections, int) and self.max_detections >= 1,
                 f"fusion max_detections must be a positive integer, got {self.max_detections!r}")
        classes = tuple(self.classes) if isinstance(self.classes, (list, tuple)) else ()
        _require(bool(classes), f"fusion classes must be a non-empty list of names, got {self.classes!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        object.__setattr__(self, "classes", classes)
