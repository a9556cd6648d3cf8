"""The single detector: preprocess -> detector -> postprocess -> router, today's `detect` (builder/steps.py)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from builder.errors import BuilderError
from builder.repository import render_repository
from builder.spec import PipelineSpec
from builder.targets import TargetProfile

if TYPE_CHECKING:
    from builder.optimize.variants import Variant

SUMMARY = "one detector: preprocess, detector, postprocess, router (cloud below router.min_confidence)"


def render(spec: PipelineSpec, out: Path, target: TargetProfile | None = None, variant: "Variant | None" = None,
           second_variant: "Variant | None" = None) -> Path:
    if second_variant is not None:
        raise BuilderError("a single pipeline has one detector: --second-variant is for a cascade's fast stage or a "
                           "parallel ensemble's second model")
    return render_repository(spec, out, target, variant)
