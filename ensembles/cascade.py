"""The cascade: a fast model answers when confident, the precise (the spec's) model when not, the cloud last.

Triton ensembles cannot branch, so the branching is a BLS Python model (backends/cascade) asking two member
ensembles (<name>_fast, <name>_precise: each preprocess, detector, postprocess) in turn; the router after it
sends what the precise model still answers below router.min_confidence to the cloud, when one is configured.

    IMAGE -> <name>_cascade (BLS: <name>_fast, then <name>_precise for images whose best score < min_confidence)
          -> <name>_router -> BOXES ... SOURCE, DEGRADED, STATUS; STAGE (fast|precise per image)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from backends.common import tensors as T
from backends.common.pipeline_settings import CascadeSettings
from builder import steps
from builder.model_inspect import inspect_onnx
from builder.repository import _write_model, target_for
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from builder.triton_config import EnsembleStep, ModelConfig, TensorConfig
from ensembles.members import EDGE, member_ensemble, member_variants, pipeline_target, render_member, second_spec
from ensembles.render import render_several

SUMMARY = "fast model when confident, else the spec's model, then the cloud (BLS: ensembles cannot branch)"
STAGES = ("fast", "precise")


def cascade_config(name: str, settings: CascadeSettings, postprocess: ModelConfig, target: TargetProfile) -> ModelConfig:
    status = TensorConfig(T.STATUS, "BYTES", (1,))
    return ModelConfig(
        name=f"{name}_cascade", backend="python", max_batch_size=target.max_batch_size,
        inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),),
        outputs=postprocess.outputs + (TensorConfig(T.STAGE, "BYTES", (1,)), status),
        instance_groups=steps._instances("KIND_CPU", target.router_instances, target),
        dynamic_batching=steps._batching(target.max_batch_size, target),
        parameters={steps.CONFIG_PARAMETER: settings.to_json()},
    )


def stage_router(router: ModelConfig) -> ModelConfig:
    """The router with the cascade's STAGE passed through (IMAGE_STAGE in, STAGE out)."""
    return dataclasses.replace(router, inputs=router.inputs + (TensorConfig(T.IMAGE_STAGE, "BYTES", (1,), optional=True),),
                               outputs=router.outputs + (TensorConfig(T.STAGE, "BYTES", (1,)),))


def render(spec: PipelineSpec, out: Path, target: TargetProfile | None = None, variant=None,
           second_variant=None) -> Path:
    """variant: served by the precise stage instead of the spec's model; second_variant: by the fast stage (a
    variant of the second model at its own input size)."""
    target = pipeline_target(target or target_for(spec), variant, second_variant)

    def build(staging: Path, work: Path, target: TargetProfile):
        fast = render_member(second_spec(spec, work), "fast", target, staging, second_variant, work)
        precise = render_member(spec, "precise", target, staging, variant, work)
        for member in (fast, precise):
            _write_model(staging, member_ensemble(member), None)
        settings = CascadeSettings(stages=(fast.name, precise.name), stage_names=STAGES,
                                   min_confidence=spec.pipeline.min_confidence)
        cascade = cascade_config(spec.name, settings, precise.configs.postprocess, target)
        _write_model(staging, cascade, "cascade")
        router = stage_router(steps.pipeline_configs(spec, target, inspect_onnx(spec.model_path)).router)
        _write_model(staging, router, "router")
        edge = {name: name for name in EDGE}
        passed = {T.STAGE: T.IMAGE_STAGE, T.STATUS: T.IMAGE_STATUS}  # the router passes both on (tensors.py)
        ensemble = ModelConfig(
            name=spec.name, platform="ensemble", max_batch_size=target.max_batch_size,
            inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),),
            outputs=router.outputs,
            ensemble_steps=(
                EnsembleStep(cascade.name, {T.IMAGE: T.IMAGE}, {**edge, **passed}),
                EnsembleStep(router.name, {T.IMAGE: T.IMAGE, **edge, **{v: v for v in passed.values()}},
                             {t.name: t.name for t in router.outputs}),
            ))
        return ensemble, {"stages": {"fast": str(fast.spec.model_path), "precise": str(precise.spec.model_path)},
                          "min_confidence": spec.pipeline.min_confidence,
                          "variants": member_variants((fast, precise)),
                          "inputs": {"fast": [fast.spec.input.height, fast.spec.input.width],
                                     "precise": [precise.spec.input.height, precise.spec.input.width]}}

    return render_several(spec, out, target, build)
