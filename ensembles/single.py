"""The single detector: preprocess -> detector -> postprocess -> router, today's `detect` (builder/steps.py)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from builder.repository import render_repository
from builder.spec import PipelineSpec
from builder.targets import TargetProfile

if TYPE_CHECKING:
    from builder.optimize.variants import Variant

SUMMARY = "one detector: preprocess, detector, postprocess, router (cloud below router.min_confidence)"


def render(spec: PipelineSpec, out: Path, target: TargetProfile | None = None, variant: "Variant | None" = None) -> Path:
    return render_repository(spec, out, target, variant)
