"""Rendering typed Triton configurations (builder/triton_config.py) to config.pbtxt, through Triton's own
protobuf schema.

dataclasses --to_dict--> dict --json_format.ParseDict--> model_config_pb2.ModelConfig --text_format-->
config.pbtxt, as NVIDIA pytriton's model_config generator does; the inverse, config.pbtxt -> dataclasses,
is builder/triton_config_parse.py. Schema errors at the protobuf boundary raise ConfigError.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from .errors import ConfigError
from .triton_config import CONFIG_FILENAME, ModelConfig, ModelWarmup, TensorConfig


def _tensor_dict(tensor: TensorConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tensor.name, "data_type": tensor.data_type, "dims": list(tensor.dims)}
    if tensor.reshape is not None:
        out["reshape"] = {"shape": list(tensor.reshape)}
    return {**out, "optional": True} if tensor.optional else out


def _warmup_dict(warmup: ModelWarmup) -> dict[str, Any]:
    inputs = {}
    for name, data in warmup.inputs.items():
        source = {"zero_data": True} if data.zero_data else (
            {"random_data": True} if data.random_data else {"input_data_file": data.input_data_file})
        inputs[name] = {"data_type": data.data_type, "dims": list(data.dims), **source}
    return {"name": warmup.name, "batch_size": warmup.batch_size, "inputs": inputs}


def to_dict(config: ModelConfig) -> dict[str, Any]:
    """The configuration as a dict in the protobuf JSON layout (proto field names) ParseDict accepts."""
    out: dict[str, Any] = {"name": config.name}
    for key in ("platform", "backend", "default_model_filename"):
        if getattr(config, key) is not None:
            out[key] = getattr(config, key)
    if config.version_policy_latest is not None:
        out["version_policy"] = {"latest": {"num_versions": config.version_policy_latest}}
    if config.max_batch_size:
        out["max_batch_size"] = config.max_batch_size
    if config.inputs:
        out["input"] = [_tensor_dict(t) for t in config.inputs]
    if config.outputs:
        out["output"] = [_tensor_dict(t) for t in config.outputs]
    if config.instance_groups:
        out["instance_group"] = [{"kind": g.kind, "count": g.count, **({"gpus": list(g.gpus)} if g.gpus else {})}
                                 for g in config.instance_groups]
    if config.dynamic_batching is not None:
        batching = config.dynamic_batching
        out["dynamic_batching"] = {"preferred_batch_size": list(batching.preferred_batch_size),
                                   "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
                                   "preserve_ordering": batching.preserve_ordering}
    if config.ensemble_steps:
        out["ensemble_scheduling"] = {"step": [
            {"model_name": s.model_name, "model_version": s.model_version,
             "input_map": dict(s.input_map), "output_map": dict(s.output_map)} for s in config.ensemble_steps]}
    if config.parameters:
        out["parameters"] = {k: {"string_value": v} for k, v in config.parameters.items()}
    if config.optimization is not None:
        accelerators = {
            key: [{"name": a.name, "parameters": dict(a.parameters)} for a in group]
            for key, group in (("gpu_execution_accelerator", config.optimization.gpu_accelerators),
                               ("cpu_execution_accelerator", config.optimization.cpu_accelerators)) if group
        }
        out["optimization"] = {"execution_accelerators": accelerators} if accelerators else {}
    if config.warmup:
        out["model_warmup"] = [_warmup_dict(w) for w in config.warmup]
    return out


def dict_to_proto(data: Mapping[str, Any]) -> model_config_pb2.ModelConfig:
    """ParseDict into Triton's ModelConfig message; schema errors become ConfigError."""
    try:
        return json_format.ParseDict(data, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        name = data.get("name", "?") if isinstance(data, Mapping) else "?"
        raise ConfigError(f"model {name!r}: does not fit Triton's ModelConfig schema: {exc}") from exc


def to_proto(config: ModelConfig) -> model_config_pb2.ModelConfig:
    """The configuration as Triton's protobuf message."""
    return dict_to_proto(to_dict(config))


def render(config: ModelConfig) -> str:
    """The config.pbtxt text (protobuf text format)."""
    return text_format.MessageToString(to_proto(config), as_utf8=True)


def write_config(config: ModelConfig, model_dir: pathlib.Path) -> pathlib.Path:
    """Render `config` to model_dir/config.pbtxt (replaced atomically) and return that path."""
    text = render(config)
    path = pathlib.Path(model_dir) / CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_FILENAME}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
