"""The detectors of a pipeline of several models: each rendered as its own preprocess, detector and postprocess
models (builder/steps.py), named <pipeline>_<member>_*, whose tensors the pipeline wires together."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.common import tensors as T
from builder import steps
from builder.model_inspect import inspect_onnx
from builder.repository import (_check_variant, _write_detector_model, _write_model, check_interface,
                                target_for_variant, variant_record)
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from builder.triton_config import EnsembleStep, ModelConfig, TensorConfig
from ensembles.input_resize import resize_input

if TYPE_CHECKING:
    from builder.optimize.variants import Variant

EDGE = tuple(T.EDGE_TO_FINAL)  # postprocess's outputs: EDGE_BOXES ... EDGE_NUM_DETECTIONS


@dataclass(frozen=True)
class Member:
    """One detector of a pipeline: its spec (named <pipeline>_<role>) and its three step configs."""

    role: str
    spec: PipelineSpec
    configs: steps.PipelineConfigs
    variant: "Variant | None" = None  # the built variant its detector serves instead of spec.model_path

    @property
    def name(self) -> str:
        return self.spec.name


def second_spec(spec: PipelineSpec, work_dir: Path) -> PipelineSpec:
    """The pipeline's second detector: the spec with pipeline.second's model, input size and score threshold.
    The spec's fixed-size graph at another size is rewritten into work_dir (ensembles/input_resize.py)."""
    second = spec.pipeline.second
    assert second is not None
    model_path = Path(second.path) if second.path is not None else spec.model_path
    spec_input = spec.input
    if second.height is not None and (second.height, second.width) != (spec.input.height, spec.input.width):
        spec_input = dataclasses.replace(spec.input, height=second.height, width=second.width)
        model_in = inspect_onnx(model_path).inputs[spec.input_name]
        h_axis, w_axis = (1, 2) if spec.input.layout == "NHWC" else (2, 3)
        if (model_in.shape[h_axis], model_in.shape[w_axis]) != (second.height, second.width) and -1 not in (
                model_in.shape[h_axis], model_in.shape[w_axis]):
            model_path = resize_input(model_path, work_dir / f"{model_path.stem}_{second.width}x{second.height}.onnx",
                                      spec.input_name, spec.input.layout, second.height, second.width)
    thresholds = spec.thresholds
    if second.score is not None:
        thresholds = dataclasses.replace(thresholds, score=second.score)
    return spec.replace(model_path=model_path, input=spec_input, thresholds=thresholds)


def render_member(spec: PipelineSpec, role: str, target: TargetProfile, staging: Path,
                  variant: "Variant | None" = None, work_dir: Path | None = None) -> Member:
    """Write the member's preprocess, detector and postprocess models into staging (named <spec.name>_<role>_*).
    variant: a built variant of the member's own model (its input size) served instead of it; on the intel target
    a member without one serves its model converted to OpenVINO FP32 in work_dir."""
    member = spec.replace(name=f"{spec.name}_{role}")
    interface = inspect_onnx(member.model_path)
    check_interface(member, interface)
    if variant is not None:
        _check_variant(member, variant)
    elif target.detector_engine == "python_openvino":
        from builder.optimize.openvino_variants import build_openvino

        variant = build_openvino(member.model_path, Path(work_dir or staging.parent) / f"ov-fp32-{role}", "fp32")
    configs = steps.pipeline_configs(member, target, interface)
    _write_model(staging, configs.preprocess, "preprocess")
    detector_dir = _write_model(staging, configs.detector, "detector" if target.python_detector else None)
    _write_detector_model(member, target, variant, detector_dir / "1")
    _write_model(staging, configs.postprocess, "postprocess")
    return Member(role, member, configs, variant)


def member_variants(members: "list[Member] | tuple[Member, ...]") -> dict[str, Any]:
    """For <name>.pipeline.json: role -> the variant its detector serves (as a single pipeline records it)."""
    return {m.role: variant_record(m.variant) for m in members if m.variant is not None}


def pipeline_target(target: TargetProfile, *variants: "Variant | None") -> TargetProfile:
    """The target that serves every given variant (builder.repository.target_for_variant), or TargetError."""
    for variant in variants:
        if variant is not None:
            target = target_for_variant(target, variant)
    return target


def member_steps(member: Member, prefix: str = "", status: str = T.STATUS) -> tuple[EnsembleStep, ...]:
    """The member's three steps in an ensemble, IMAGE in; its tensors are named <prefix>PREPROCESSED,
    <prefix>TRANSFORM, <prefix>RAW_OUTPUT... and <prefix>EDGE_*, its per-image status `status` ("": not used)."""
    c = member.configs
    raws = [t.name for t in c.postprocess.inputs if t.name != T.TRANSFORM]
    return (
        EnsembleStep(c.preprocess.name, {T.IMAGE: T.IMAGE}, {T.PREPROCESSED: prefix + T.PREPROCESSED,
                                                              T.TRANSFORM: prefix + T.TRANSFORM,
                                                              **({T.STATUS: status} if status else {})}),
        EnsembleStep(c.detector.name, {member.spec.input_name: prefix + T.PREPROCESSED},
                     {name: prefix + raw for name, raw in zip(member.spec.output.names, raws)}),
        EnsembleStep(c.postprocess.name, {**{raw: prefix + raw for raw in raws}, T.TRANSFORM: prefix + T.TRANSFORM},
                     {edge: prefix + edge for edge in EDGE}),
    )


def member_ensemble(member: Member) -> ModelConfig:
    """The member alone as a Triton ensemble (IMAGE -> EDGE_* and STATUS), what a cascade stage asks."""
    post = member.configs.postprocess
    status = next(t for t in member.configs.preprocess.outputs if t.name == T.STATUS)
    return ModelConfig(name=member.name, platform="ensemble", max_batch_size=member.configs.ensemble.max_batch_size,
                       inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),), outputs=post.outputs + (status,),
                       ensemble_steps=member_steps(member))
