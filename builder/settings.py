"""A spec's step settings (backends.common.settings): what the builder writes into each step's config.pbtxt,
and what evaluation and golden sets run the source model's pipeline with in process."""
from __future__ import annotations

import dataclasses

from backends.common.settings import (
    DetectorSettings,
    PipelineSettings,
    PostprocessSettings,
    PreprocessSettings,
)
from builder.input_fusion import transport_spec
from builder.spec import PipelineSpec
from builder.targets import TargetProfile


def fuses_input(spec: PipelineSpec, target: TargetProfile) -> bool:
    """Whether the detector graph takes uint8 pixels and converts them itself (builder/input_fusion.py)."""
    return target.fuse_input_conversion and spec.input.dtype != "uint8"


def detector_model_filename(target: TargetProfile) -> str:
    if target.detector_engine == "tensorrt_plan":
        return "model.plan"
    if target.detector_engine == "python_openvino":
        return "model.xml"  # with model.bin beside it
    return "model.onnx"


def preprocess_settings(spec: PipelineSpec, target: TargetProfile | None = None) -> PreprocessSettings:
    """The preprocess step's: the spec's input, or uint8 pixels where the target's detector converts them."""
    emitted = transport_spec(spec.input) if target is not None and fuses_input(spec, target) else spec.input
    return PreprocessSettings(input=emitted, limits=spec.limits)


def postprocess_settings(spec: PipelineSpec) -> PostprocessSettings:
    return PostprocessSettings(format=spec.output.format, classes=spec.classes, thresholds=spec.thresholds,
                               decode=spec.decode_options)


def detector_settings(spec: PipelineSpec, target: TargetProfile, fixed_batch: int | None) -> DetectorSettings:
    """The Python-backend detector's (targets with python_detector)."""
    settings = DetectorSettings(model_file=detector_model_filename(target), input_name=spec.input_name,
                                output_names=spec.output.names, intra_op_threads=target.intra_op_threads,
                                fixed_batch=fixed_batch, intra_op_spinning=target.intra_op_spinning)
    if target.detector_engine == "python_openvino":
        # The OpenVINO runner converts uint8 pixels itself (PrePostProcessor), with the spec's scaling.
        settings = dataclasses.replace(settings, runtime="openvino", device=target.device,
                                       uint8_input=fuses_input(spec, target), input_spec=spec.input,
                                       streams=target.detector_streams)
    return settings


def pipeline_settings(spec: PipelineSpec) -> PipelineSettings:
    """The pipeline around the spec's source model, as the server runs it but with the model's own input."""
    return PipelineSettings(input_name=spec.input_name, output_names=spec.output.names,
                            preprocess=preprocess_settings(spec), postprocess=postprocess_settings(spec))
