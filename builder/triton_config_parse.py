"""config.pbtxt -> ModelConfig: the inverse of builder.triton_config_render.render.

text_format.Parse into Triton's ModelConfig message, json_format.MessageToDict with proto field
names (as pytriton's model_config parser does), then the dataclasses, which validate themselves.
Fields the dataclasses cannot represent raise ConfigError instead of being dropped silently.
"""
from __future__ import annotations

from typing import Any, Mapping

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .errors import ConfigError
from .triton_config import (
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

_MODEL_KEYS = {
    "name", "platform", "backend", "version_policy", "max_batch_size", "input", "output",
    "instance_group", "dynamic_batching", "ensemble_scheduling", "parameters", "optimization",
    "model_warmup", "default_model_filename",
}


def _only(data: Mapping[str, Any], allowed: set[str] | tuple[str, ...], where: str) -> Mapping[str, Any]:
    """Refuse fields the dataclasses cannot carry, so parse never loses configuration silently."""
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: field(s) {extra} are not supported by builder.triton_config")
    return data


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # MessageToDict writes int64 fields as strings


def _tensor(data: Mapping[str, Any], where: str) -> TensorConfig:
    _only(data, ("name", "data_type", "dims", "reshape", "optional"), where)
    reshape = data.get("reshape")
    if reshape is not None:
        reshape = _ints(_only(reshape, ("shape",), f"{where}.reshape").get("shape", ()))
    return TensorConfig(
        name=data.get("name", ""),
        data_type=data.get("data_type", "TYPE_INVALID"),
        dims=_ints(data.get("dims", ())),
        reshape=reshape,
        optional=bool(data.get("optional", False)),
    )


def _instance_group(data: Mapping[str, Any]) -> InstanceGroup:
    _only(data, ("kind", "count", "gpus"), "instance_group")
    # KIND_AUTO is the enum's zero value, so MessageToDict omits it; Triton treats count 0 as 1.
    return InstanceGroup(
        kind=data.get("kind", "KIND_AUTO"), count=int(data.get("count", 1)) or 1, gpus=_ints(data.get("gpus", ()))
    )


def _dynamic_batching(data: Mapping[str, Any]) -> DynamicBatching:
    _only(data, ("preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering"), "dynamic_batching")
    return DynamicBatching(
        preferred_batch_size=_ints(data.get("preferred_batch_size", ())),
        max_queue_delay_microseconds=int(data.get("max_queue_delay_microseconds", 0)),
        preserve_ordering=bool(data.get("preserve_ordering", False)),
    )


def _step(data: Mapping[str, Any]) -> EnsembleStep:
    _only(data, ("model_name", "model_version", "input_map", "output_map"), "ensemble_scheduling.step")
    return EnsembleStep(
        model_name=data.get("model_name", ""),
        input_map=dict(data.get("input_map", {})),
        output_map=dict(data.get("output_map", {})),
        model_version=int(data.get("model_version", 0)),
    )


def _accelerators(data: Any, where: str) -> tuple[ExecutionAccelerator, ...]:
    return tuple(
        ExecutionAccelerator(name=a.get("name", ""), parameters=dict(a.get("parameters", {})))
        for a in (_only(a, ("name", "parameters"), where) for a in data)
    )


def _optimization(data: Mapping[str, Any]) -> Optimization:
    _only(data, ("execution_accelerators",), "optimization")
    accelerators = data.get("execution_accelerators", {})
    _only(accelerators, ("gpu_execution_accelerator", "cpu_execution_accelerator"), "execution_accelerators")
    return Optimization(
        gpu_accelerators=_accelerators(accelerators.get("gpu_execution_accelerator", ()), "gpu_execution_accelerator"),
        cpu_accelerators=_accelerators(accelerators.get("cpu_execution_accelerator", ()), "cpu_execution_accelerator"),
    )


def _warmup_input(data: Mapping[str, Any]) -> WarmupInput:
    _only(data, ("data_type", "dims", "zero_data", "random_data", "input_data_file"), "model_warmup.inputs")
    return WarmupInput(
        data_type=data.get("data_type", "TYPE_INVALID"),
        dims=_ints(data.get("dims", ())),
        zero_data=bool(data.get("zero_data", False)),
        random_data=bool(data.get("random_data", False)),
        input_data_file=data.get("input_data_file"),
    )


def _warmup(data: Mapping[str, Any]) -> ModelWarmup:
    _only(data, ("name", "batch_size", "inputs"), "model_warmup")
    return ModelWarmup(
        name=data.get("name", ""),
        batch_size=int(data.get("batch_size", 0)),
        inputs={k: _warmup_input(v) for k, v in data.get("inputs", {}).items()},
    )


def _version_policy(data: Mapping[str, Any]) -> int:
    _only(data, ("latest",), "version_policy (only 'latest' is supported)")
    return int(_only(data["latest"], ("num_versions",), "version_policy.latest").get("num_versions", 0))


def from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the protobuf JSON layout (MessageToDict output or to_dict output)."""
    _only(data, _MODEL_KEYS, f"model {data.get('name', '?')!r}")
    parameters = {}
    for key, value in data.get("parameters", {}).items():
        parameters[key] = _only(value, ("string_value",), f"parameters[{key!r}]").get("string_value", "")
    return ModelConfig(
        name=data.get("name", ""),
        max_batch_size=int(data.get("max_batch_size", 0)),
        backend=data.get("backend"),
        platform=data.get("platform"),
        inputs=tuple(_tensor(t, f"input {t.get('name', '?')!r}") for t in data.get("input", ())),
        outputs=tuple(_tensor(t, f"output {t.get('name', '?')!r}") for t in data.get("output", ())),
        instance_groups=tuple(_instance_group(g) for g in data.get("instance_group", ())),
        dynamic_batching=_dynamic_batching(data["dynamic_batching"]) if "dynamic_batching" in data else None,
        parameters=parameters,
        ensemble_steps=tuple(
            _step(s) for s in _only(data.get("ensemble_scheduling", {}), ("step",), "ensemble_scheduling").get("step", ())
        ),
        optimization=_optimization(data["optimization"]) if "optimization" in data else None,
        warmup=tuple(_warmup(w) for w in data.get("model_warmup", ())),
        default_model_filename=data.get("default_model_filename"),
        version_policy_latest=_version_policy(data["version_policy"]) if "version_policy" in data else None,
    )


def from_proto(message: model_config_pb2.ModelConfig) -> ModelConfig:
    """Build a ModelConfig from Triton's protobuf message."""
    return from_dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


def parse(text: str) -> ModelConfig:
    """Parse config.pbtxt text into a ModelConfig (inverse of render); syntax and schema errors raise
    ConfigError."""
    try:
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"not a valid Triton model configuration (config.pbtxt): {exc}") from exc
    return from_proto(message)
