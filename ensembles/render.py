"""Render a pipeline of several models: its members and joining steps into a staging folder, then moved into the
repository in one go (as builder.repository.render_repository does), with <name>.pipeline.json describing it."""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from backends.common.files import sha256_file
from builder.repository import _write_model, publish_staging, target_for
from builder.settings import pipeline_settings
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from builder.triton_config import ModelConfig

# build(staging, work_dir, target) -> (the top ensemble, a description of the pipeline for <name>.pipeline.json)
Build = Callable[[Path, Path, TargetProfile], tuple[ModelConfig, dict]]


def render_several(spec: PipelineSpec, out: Path, target: TargetProfile | None, build: Build) -> Path:
    target = target or target_for(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-render-", dir=out.parent) as tmp:
        staging = Path(tmp) / "repository"
        staging.mkdir()
        ensemble, description = build(staging, Path(tmp) / "work", target)
        _write_model(staging, ensemble, None)
        pipeline = {
            "spec": spec.to_dict(),
            "settings": pipeline_settings(spec).to_dict(),  # the spec's own model's, what golden sets run
            "target": asdict(target),
            "model_sha256": sha256_file(spec.model_path),
            "ensemble": ensemble.name,
            "kind": spec.pipeline.kind,
            "outputs": [t.name for t in ensemble.outputs],
            **description,
        }
        publish_staging(staging, out, spec.name, pipeline)
    return out
