"""The spec's `pipeline` section: which pipeline of models serves the spec (rendered by ensembles/).

    pipeline:
      kind: cascade            # single (default) | cascade | parallel
      second:                  # the other detector: the spec's model at another input size, or another model
        height: 320            #   a fixed-size graph is rewritten to this size by the builder
        width: 320
        path: other.onnx       #   optional, relative to the spec; same input/output conventions as the spec's
        score: 0.3             #   optional: its score threshold (default: the spec's)
      min_confidence: 0.5      # cascade: the fast (second) model answers when its best score reaches this
      fusion: {iou: 0.55, skip_score: 0.0, weights: [1, 1]}   # parallel: Weighted Boxes Fusion of the two

cascade: the second (fast) model answers when confident, else the spec's (precise) model, then the router's cloud.
parallel: the spec's model and the second run side by side on every image; their boxes are fused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from builder.errors import SpecError

PIPELINE_KINDS = ("single", "cascade", "parallel")  # ensembles.PIPELINES has one module per kind


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SecondModel:
    """The pipeline's other detector, as changes to the spec's own: another input size, model file, threshold."""

    height: Optional[int] = None
    width: Optional[int] = None
    path: Optional[Path] = None
    score: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 32),
                     f"pipeline.second.{name} must be an integer >= 32, got {value!r}")
        _require((self.height is None) == (self.width is None), "pipeline.second: give both height and width, or neither")
        _require(self.path is None or Path(self.path).is_file(), f"pipeline.second.path {self.path} does not exist")
        _require(self.score is None or (_number(self.score) and 0 <= self.score < 1),
                 f"pipeline.second.score must be in [0, 1), got {self.score!r}")


@dataclass(frozen=True)
class Fusion:
    """Weighted Boxes Fusion of the parallel pipeline (ensemble_boxes.weighted_boxes_fusion's arguments)."""

    iou: float = 0.55
    skip_score: float = 0.0
    weights: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        _require(_number(self.iou) and 0 < self.iou <= 1, f"pipeline.fusion.iou must be in (0, 1], got {self.iou!r}")
        _require(_number(self.skip_score) and 0 <= self.skip_score < 1,
                 f"pipeline.fusion.skip_score must be in [0, 1), got {self.skip_score!r}")
        weights = tuple(self.weights) if isinstance(self.weights, (list, tuple)) else ()
        _require(len(weights) == 2 and all(_number(w) and w > 0 for w in weights),
                 f"pipeline.fusion.weights must be two positive numbers (spec's model, second), got {self.weights!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))


@dataclass(frozen=True)
class PipelineChoice:
    kind: str = "single"
    second: Optional[SecondModel] = None
    min_confidence: float = 0.5
    fusion: Fusion = field(default_factory=Fusion)

    def __post_init__(self) -> None:
        _require(self.kind in PIPELINE_KINDS, f"pipeline.kind {self.kind!r} is not one of {PIPELINE_KINDS}")
        _require(self.kind == "single" or self.second is not None,
                 f"pipeline.second is required for a {self.kind} pipeline (e.g. second: {{height: 320, width: 320}})")
        _require(_number(self.min_confidence) and 0 <= self.min_confidence <= 1,
                 f"pipeline.min_confidence must be in [0, 1], got {self.min_confidence!r}")


def _fields(raw: Any, where: str, known: set[str]) -> Mapping[str, Any]:
    raw = raw or {}
    _require(isinstance(raw, Mapping), f"{where} must be a mapping")
    unknown = sorted(set(raw) - known)
    _require(not unknown, f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return raw


def parse_pipeline(raw: Any, base_dir: Path) -> PipelineChoice:
    """The `pipeline` section of a spec (absent: the single detector); paths resolve against base_dir."""
    section = _fields(raw, "pipeline", {"kind", "second", "min_confidence", "fusion"})
    second = None
    if section.get("second") is not None:
        values = dict(_fields(section["second"], "pipeline.second", {"height", "width", "path", "score"}))
        if values.get("path") is not None:
            values["path"] = (base_dir / str(values["path"])).resolve()
        second = SecondModel(**values)
    fusion = Fusion(**_fields(section.get("fusion"), "pipeline.fusion", {"iou", "skip_score", "weights"}))
    return PipelineChoice(kind=str(section.get("kind", "single")), second=second,
                          min_confidence=section.get("min_confidence", 0.5), fusion=fusion)
