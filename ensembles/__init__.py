"""Pipelines of models, one module per kind; the spec's `pipeline.kind` (builder/pipeline_choice.py) chooses one.

    single    one detector: preprocess -> detector -> postprocess -> router (today's `detect`)
    cascade   a fast model answers when confident, the spec's model when not, the cloud last (BLS model)
    parallel  the spec's model and a second one on every image, boxes fused with Weighted Boxes Fusion

Each module has SUMMARY and render(spec, out, target=None, variant=None, second_variant=None) -> out (variant: served
instead of the spec's model; second_variant: instead of the second detector's); render_pipeline picks by kind.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from builder.pipeline_choice import PIPELINE_KINDS
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from ensembles import cascade, parallel, single

if TYPE_CHECKING:
    from builder.optimize.variants import Variant

PIPELINES: dict[str, ModuleType] = {"single": single, "cascade": cascade, "parallel": parallel}
assert tuple(PIPELINES) == PIPELINE_KINDS


def render_pipeline(spec: PipelineSpec, out: Path, target: TargetProfile | None = None,
                    variant: "Variant | None" = None, second_variant: "Variant | None" = None) -> Path:
    """Render the spec's pipeline (spec.pipeline.kind) into the repository out and return out."""
    return PIPELINES[spec.pipeline.kind].render(spec, Path(out), target, variant, second_variant)
