"""The typed Triton configurations of each pipeline step and of the ensemble that wires them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from backends.common import tensors as T
from backends.common.geometry import TRANSFORM_WIDTH
from backends.common.settings import JsonSettings
from builder.model_inspect import ModelInterface
from builder.settings import (
    detector_model_filename,
    detector_settings,
    fuses_input,
    postprocess_settings,
    preprocess_settings,
)
from builder.spec import PipelineSpec
from builder.targets import TargetProfile
from builder.triton_config import (
    DynamicBatching,
    EnsembleStep,
    ExecutionAccelerator,
    InstanceGroup,
    ModelConfig,
    ModelWarmup,
    Optimization,
    TensorConfig,
    WarmupInput,
)

CONFIG_PARAMETER = T.CONFIG_PARAMETER
# Per image "" or "image <index>: <error>" (backends/preprocess/batch.py): preprocess -> router and the client
STATUS_TENSOR = TensorConfig(T.STATUS, "BYTES", (1,))
ROUTER_STATUS = TensorConfig(T.IMAGE_STATUS, "BYTES", (1,), optional=True)  # the router passes it on as STATUS


@dataclass(frozen=True)
class PipelineConfigs:
    preprocess: ModelConfig
    detector: ModelConfig
    postprocess: ModelConfig
    router: ModelConfig
    ensemble: ModelConfig


def _batching(max_batch_size: int, target: TargetProfile) -> DynamicBatching | None:
    if max_batch_size <= 1:
        return None
    return DynamicBatching(max_queue_delay_microseconds=target.max_queue_delay_us)


def _instances(kind: str, count: int, target: TargetProfile) -> tuple[InstanceGroup, ...]:
    gpus = target.gpus if kind == "KIND_GPU" else ()
    return (InstanceGroup(kind=kind, count=count, gpus=gpus),)


def _python_model(name: str, settings: JsonSettings, *, max_batch_size: int, target: TargetProfile, kind: str, count: int,
                  inputs: tuple[TensorConfig, ...], outputs: tuple[TensorConfig, ...], warmup: tuple[ModelWarmup, ...] = ()) -> ModelConfig:
    return ModelConfig(
        name=name,
        backend="python",
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instance_groups=_instances(kind, count, target),
        dynamic_batching=_batching(max_batch_size, target),
        parameters={CONFIG_PARAMETER: settings.to_json()},
        warmup=warmup,
    )


def _model_outputs(spec: PipelineSpec, interface: ModelInterface) -> tuple[TensorConfig, ...]:
    """The detector's output tensors, one per role of the output format, in its order. One value per image
    ([B], e.g. TF's num_detections) is [1] to the ensemble, reshaped to the model's []."""
    return tuple(TensorConfig(name, interface.outputs[name].dtype, interface.outputs[name].shape[1:] or (1,),
                              reshape=None if interface.outputs[name].shape[1:] else ())
                 for name in spec.output.names)


def _detector(spec: PipelineSpec, target: TargetProfile, interface: ModelInterface, max_batch_size: int) -> ModelConfig:
    model_in = interface.inputs[spec.input_name]
    in_dtype = "uint8" if fuses_input(spec, target) else model_in.dtype
    inputs = (TensorConfig(spec.input_name, in_dtype, spec.input_shape),)
    outputs = _model_outputs(spec, interface)
    warmup = (
        ModelWarmup(
            name="random_image",
            batch_size=1,
            inputs={spec.input_name: WarmupInput(data_type=in_dtype, dims=spec.input_shape, random_data=True)},
        ),
    )
    name = f"{spec.name}_detector"
    if target.python_detector:
        config = _python_model(name, detector_settings(spec, target, interface.fixed_batch), max_batch_size=max_batch_size,
                               target=target, kind="KIND_CPU", count=target.detector_instances, inputs=inputs,
                               outputs=outputs, warmup=warmup)
        if interface.fixed_batch == 1:
            # The graph runs image by image anyway; a batch of requests would all answer when its last
            # image is done, which only adds tail latency. One request per execute().
            config = dataclasses.replace(config, dynamic_batching=None)
        return config
    optimization = None
    if target.detector_engine == "onnxruntime_onnx":
        trt_parameters = {"precision_mode": target.precision.upper(), "max_workspace_size_bytes": str(target.max_workspace_bytes)}
        optimization = Optimization(gpu_accelerators=(ExecutionAccelerator("tensorrt", trt_parameters),))
    return ModelConfig(
        name=name,
        platform=target.detector_engine,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        instance_groups=_instances("KIND_GPU", target.detector_instances, target),
        dynamic_batching=_batching(max_batch_size, target),
        optimization=optimization,
        default_model_filename=detector_model_filename(target),
        warmup=warmup,
    )


def pipeline_configs(spec: PipelineSpec, target: TargetProfile, interface: ModelInterface) -> PipelineConfigs:
    """All five configurations. A native detector whose graph has a fixed batch caps the ensemble's batch."""
    max_batch = target.max_batch_size
    fixed = interface.fixed_batch
    native_detector = not target.python_detector
    detector_max_batch = min(max_batch, fixed) if (native_detector and fixed) else max_batch
    ensemble_max_batch = detector_max_batch
    preprocess_kind = "KIND_GPU" if target.on_gpu else "KIND_CPU"
    preprocess_step = preprocess_settings(spec, target)
    postprocess_step = postprocess_settings(spec)
    raw_outputs = T.raw_outputs(postprocess_step.roles)
    model_outputs = _model_outputs(spec, interface)

    preprocess = _python_model(
        f"{spec.name}_preprocess",
        preprocess_step,
        max_batch_size=max_batch, target=target, kind=preprocess_kind, count=target.preprocess_instances,
        inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),),
        outputs=(TensorConfig(T.PREPROCESSED, preprocess_step.input.dtype, spec.input_shape),
                 TensorConfig(T.TRANSFORM, "float32", (TRANSFORM_WIDTH,)), STATUS_TENSOR),
    )
    detector = _detector(spec, target, interface, detector_max_batch)
    postprocess = _python_model(
        f"{spec.name}_postprocess",
        postprocess_step,
        max_batch_size=max_batch, target=target, kind="KIND_CPU", count=target.postprocess_instances,
        inputs=tuple(TensorConfig(raw, out.data_type, out.dims) for out, raw in zip(model_outputs, raw_outputs))
        + (TensorConfig(T.TRANSFORM, "float32", (TRANSFORM_WIDTH,)),),
        outputs=_detection_tensors(edge=True),
    )
    router = _python_model(
        f"{spec.name}_router",
        spec.router,
        max_batch_size=max_batch, target=target, kind="KIND_CPU", count=target.router_instances,
        inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),) + _detection_tensors(edge=True) + (ROUTER_STATUS,),
        outputs=_detection_tensors(edge=False) + (TensorConfig(T.SOURCE, "BYTES", (1,)), TensorConfig(T.DEGRADED, "BOOL", (1,)),
                                                   STATUS_TENSOR),
    )
    edge_map = {name: name for name in T.EDGE_TO_FINAL}
    raw_map = {raw: raw for raw in raw_outputs}
    ensemble = ModelConfig(
        name=spec.name,
        platform="ensemble",
        max_batch_size=ensemble_max_batch,
        inputs=(TensorConfig(T.IMAGE, "BYTES", (1,)),),
        outputs=router.outputs,
        ensemble_steps=(
            EnsembleStep(preprocess.name, {T.IMAGE: T.IMAGE},
                         {T.PREPROCESSED: T.PREPROCESSED, T.TRANSFORM: T.TRANSFORM, T.STATUS: T.IMAGE_STATUS}),
            EnsembleStep(detector.name, {spec.input_name: T.PREPROCESSED}, dict(zip(spec.output.names, raw_outputs))),
            EnsembleStep(postprocess.name, {**raw_map, T.TRANSFORM: T.TRANSFORM}, edge_map),
            EnsembleStep(router.name, {T.IMAGE: T.IMAGE, **edge_map, T.IMAGE_STATUS: T.IMAGE_STATUS},
                         {name: name for name in (*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS)}),
        ),
    )
    return PipelineConfigs(preprocess, detector, postprocess, router, ensemble)


def _detection_tensors(*, edge: bool) -> tuple[TensorConfig, ...]:
    names = list(T.EDGE_TO_FINAL) if edge else list(T.EDGE_TO_FINAL.values())
    boxes, scores, class_ids, class_names, count = names
    return (
        TensorConfig(boxes, "float32", (-1, 4)),
        TensorConfig(scores, "float32", (-1,)),
        TensorConfig(class_ids, "int32", (-1,)),
        TensorConfig(class_names, "BYTES", (-1,)),
        TensorConfig(count, "int32", (1,)),
    )
