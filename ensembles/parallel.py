"""The parallel ensemble: the spec's model and a second detector run side by side on every image (Triton runs the
two branches of one ensemble concurrently); their boxes are fused with Weighted Boxes Fusion (backends/fusion).

    IMAGE -> <name>_a_preprocess -> <name>_a_detector -> <name>_a_postprocess -> A_EDGE_* --+
          -> <name>_b_preprocess -> <name>_b_detector -> <name>_b_postprocess -> B_EDGE_* --+-> <name>_fusion
          -> <name>_router -> BOXES ... SOURCE, DEGRADED, STATUS
"""
from __future__ import annotations

from pathlib import Path

from backends.common import tensors as T
from backends.common.pipeline_settings import FusionSettings
from backends.fusion.wbf import member_prefixes
from builder import steps
from builder.model_inspect import inspect_onnx
from builder.repository import _write_model, target_for
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from builder.triton_config import EnsembleStep, ModelConfig, TensorConfig
from ensembles.members import EDGE, member_steps, member_variants, pipeline_target, render_member, second_spec
from ensembles.render import render_several

SUMMARY = "the spec's model and a second one on every image, boxes fused (Weighted Boxes Fusion)"


def fusion_config(name: str, settings: FusionSettings, postprocess: ModelConfig, target: TargetProfile) -> ModelConfig:
    inputs = tuple(TensorConfig(f"{p}_{t.name}", t.data_type, t.dims)
                   for p in member_prefixes(len(settings.weights)) for t in postprocess.outputs)
    transform = next(t for t in postprocess.inputs if t.name == T.TRANSFORM)
    return ModelConfig(
        name=f"{name}_fusion", backend="python", max_batch_size=target.max_batch_size,
        inputs=inputs + (transform,), outputs=postprocess.outputs,
        instance_groups=steps._instances("KIND_CPU", target.postprocess_instances, target),
        dynamic_batching=steps._batching(target.max_batch_size, target),
        parameters={steps.CONFIG_PARAMETER: settings.to_json()},
    )


def render(spec: PipelineSpec, out: Path, target: TargetProfile | None = None, variant=None,
           second_variant=None) -> Path:
    """variant: served by member a instead of the spec's model; second_variant: by member b (a variant of the
    second model at its own input size)."""
    target = pipeline_target(target or target_for(spec), variant, second_variant)

    def build(staging: Path, work: Path, target: TargetProfile):
        members = [render_member(spec, "a", target, staging, variant, work),
                   render_member(second_spec(spec, work), "b", target, staging, second_variant, work)]
        prefixes = member_prefixes(len(members))
        f = spec.pipeline.fusion
        settings = FusionSettings(weights=f.weights, iou=f.iou, skip_score=f.skip_score,
                                  max_detections=spec.thresholds.max_detections, classes=spec.classes)
        fusion = fusion_config(spec.name, settings, members[0].configs.postprocess, target)
        _write_model(staging, fusion, "fusion")
        router = steps.pipeline_configs(spec, target, inspect_onnx(spec.model_path)).router
        _write_model(staging, router, "router")
        branches = tuple(step for m, p in zip(members, prefixes) for step in member_steps(m, f"{p}_", T.IMAGE_STATUS if p == prefixes[0] else ""))
        edge = {name: name for name in EDGE}
        ensemble = ModelConfig(
            name=spec.name, platform="ensemble", max_batch_size=target.max_batch_size,
            inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),), outputs=router.outputs,
            ensemble_steps=branches + (
                EnsembleStep(fusion.name, {**{f"{p}_{e}": f"{p}_{e}" for p in prefixes for e in EDGE},
                                           T.TRANSFORM: f"{prefixes[0]}_{T.TRANSFORM}"}, edge),
                EnsembleStep(router.name, {T.IMAGE: T.IMAGE, **edge, T.IMAGE_STATUS: T.IMAGE_STATUS},
                             {t.name: t.name for t in router.outputs}),
            ))
        return ensemble, {"members": {m.role: str(m.spec.model_path) for m in members},
                          "variants": member_variants(members),
                          "inputs": {m.role: [m.spec.input.height, m.spec.input.width] for m in members},
                          "fusion": {"weights": list(f.weights), "iou": f.iou, "skip_score": f.skip_score}}

    return render_several(spec, out, target, build)
