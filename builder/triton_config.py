"""Triton model configurations as typed dataclasses that validate themselves.

Every dataclass validates (and normalises) itself on construction and raises ConfigError, so a mis-wired
ensemble or an impossible batching setup fails at build time, not when tritonserver loads the repository.
Rendering them to config.pbtxt through Triton's own protobuf schema is builder/triton_config_render.py;
parsing config.pbtxt back into them is builder/triton_config_parse.py.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, NoReturn

from tritonclient.grpc import model_config_pb2

from .errors import ConfigError

CONFIG_FILENAME = "config.pbtxt"
ENSEMBLE_PLATFORM = "ensemble"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL")
TRITON_DTYPES = tuple(n for n in model_config_pb2.DataType.keys() if n != "TYPE_INVALID")
_NUMPY_DTYPES = {
    "bool_": "BOOL", "float16": "FP16", "half": "FP16", "float32": "FP32", "single": "FP32",
    "float64": "FP64", "double": "FP64", "bfloat16": "BF16", "bytes": "STRING", "bytes_": "STRING",
    "object": "STRING", "object_": "STRING",
}


def _fail(owner: str, message: str) -> NoReturn:
    raise ConfigError(f"{owner}: {message}")


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalise a field of a frozen dataclass


def triton_dtype(value: Any) -> str:
    """Normalise "FP32" / "TYPE_FP32" / "float32" / np.float32 / "BYTES" to Triton's TYPE_* name."""
    if not isinstance(value, str):
        import numpy as np

        try:
            value = np.dtype(value).name
        except TypeError as exc:
            raise ConfigError(f"unknown data type {value!r}") from exc
    key = value.strip()
    name = _NUMPY_DTYPES.get(key.lower(), key.upper().removeprefix("TYPE_"))
    name = "TYPE_" + ("STRING" if name == "BYTES" else name)
    if name not in TRITON_DTYPES:
        raise ConfigError(
            f"unknown data type {value!r}; use a Triton name (FP32, TYPE_FP32, BYTES, ...) "
            "or a numpy name (float32, uint8, object, ...)"
        )
    return name


def _dtype(owner: str, value: Any) -> str:
    try:
        return triton_dtype(value)
    except ConfigError as exc:
        _fail(owner, str(exc))


def _int(owner: str, what: str, value: Any, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        _fail(owner, f"{what} must be an integer, got {value!r}")
    if number < minimum:
        _fail(owner, f"{what} must be >= {minimum}, got {number}")
    return number


def _dims(owner: str, what: str, dims: Any, wildcard: bool = True, empty: bool = False) -> tuple[int, ...]:
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        _fail(owner, f"{what} must be a sequence of integers, got {dims!r}")
    out = tuple(_int(owner, what, d, -1 if wildcard else 1) for d in dims)
    if any(d == 0 for d in out):
        _fail(owner, f"{what} entries must be positive" + (" or -1" if wildcard else "") + f", got {out}")
    if not out and not empty:
        _fail(owner, f"{what} must not be empty")
    return out


def _name(owner: str, what: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(owner, f"{what} must be a non-empty string, got {value!r}")
    return value


def _str_map(owner: str, what: str, mapping: Any, empty_values: bool = True) -> dict[str, str]:
    if not isinstance(mapping, Mapping):
        _fail(owner, f"{what} must be a mapping of str to str, got {type(mapping).__name__}")
    for key, value in mapping.items():
        _name(owner, f"{what} key", key)
        if not isinstance(value, str) or (not empty_values and not value):
            _fail(owner, f"{what}[{key!r}] must be a {'' if empty_values else 'non-empty '}string, got {value!r}")
    return dict(mapping)


def _items(owner: str, what: str, values: Any, kind: type) -> tuple:
    values = tuple(values)
    for value in values:
        if not isinstance(value, kind):
            _fail(owner, f"{what} entries must be {kind.__name__}, got {type(value).__name__}")
    return values


@dataclass(frozen=True)
class TensorConfig:
    """One model input or output; `reshape=()` reshapes to a scalar (batching models only)."""
    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        owner = f"tensor {self.name!r}"
        _name(owner, "name", self.name)
        _set(self, "data_type", _dtype(owner, self.data_type))
        _set(self, "dims", _dims(owner, "dims", self.dims))
        if self.reshape is not None:
            _set(self, "reshape", _dims(owner, "reshape", self.reshape, empty=True))
        _set(self, "optional", bool(self.optional))


@dataclass(frozen=True)
class InstanceGroup:
    """`count` model instances of `kind`, optionally pinned to `gpus` (KIND_GPU only)."""
    kind: str = "KIND_CPU"
    count: int = 1
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        kind = str(self.kind).upper()
        kind = kind if kind.startswith("KIND_") else "KIND_" + kind
        if kind not in INSTANCE_KINDS:
            _fail("instance group", f"kind must be one of {', '.join(INSTANCE_KINDS)}, got {self.kind!r}")
        _set(self, "kind", kind)
        _set(self, "count", _int("instance group", "count", self.count, 1))
        _set(self, "gpus", tuple(_int("instance group", "gpu id", g, 0) for g in self.gpus))
        if self.gpus and kind != "KIND_GPU":
            _fail("instance group", f"gpus {self.gpus} can only be given with KIND_GPU, not {kind}")


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher settings."""
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        owner = "dynamic_batching"
        _set(self, "preferred_batch_size", _dims(owner, "preferred_batch_size", self.preferred_batch_size,
                                                  wildcard=False, empty=True))
        _set(self, "max_queue_delay_microseconds",
             _int(owner, "max_queue_delay_microseconds", self.max_queue_delay_microseconds, 0))
        _set(self, "preserve_ordering", bool(self.preserve_ordering))


@dataclass(frozen=True)
class EnsembleStep:
    """One ensemble step: input_map is {model input: ensemble tensor}, output_map {model output: ensemble tensor}."""
    model_name: str
    input_map: dict[str, str]
    output_map: dict[str, str]
    model_version: int = -1

    def __post_init__(self) -> None:
        owner = f"ensemble step {self.model_name!r}"
        _name(owner, "model_name", self.model_name)
        for what in ("input_map", "output_map"):
            mapping = _str_map(owner, what, getattr(self, what), empty_values=False)
            if not mapping:
                _fail(owner, f"{what} must not be empty")
            _set(self, what, mapping)
        version = _int(owner, "model_version", self.model_version, -1)
        if version == 0:
            _fail(owner, "model_version must be -1 (latest) or a positive version, got 0")
        _set(self, "model_version", version)


@dataclass(frozen=True)
class ExecutionAccelerator:
    """An optimization.execution_accelerators entry, e.g. ("tensorrt", {"precision_mode": "FP16"})."""
    name: str
    parameters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = f"execution accelerator {self.name!r}"
        _name(owner, "name", self.name)
        _set(self, "parameters", _str_map(owner, "parameters", self.parameters))


@dataclass(frozen=True)
class Optimization:
    """The model's `optimization` block (execution accelerators only)."""
    gpu_accelerators: tuple[ExecutionAccelerator, ...] = ()
    cpu_accelerators: tuple[ExecutionAccelerator, ...] = ()

    def __post_init__(self) -> None:
        for what in ("gpu_accelerators", "cpu_accelerators"):
            _set(self, what, _items("optimization", what, getattr(self, what), ExecutionAccelerator))


@dataclass(frozen=True)
class WarmupInput:
    """Warm-up data for one input: exactly one of zero_data, random_data, input_data_file."""
    data_type: str
    dims: tuple[int, ...]
    zero_data: bool = False
    random_data: bool = False
    input_data_file: str | None = None

    def __post_init__(self) -> None:
        _set(self, "data_type", _dtype("warmup input", self.data_type))
        _set(self, "dims", _dims("warmup input", "dims", self.dims, wildcard=False))
        if self.input_data_file is not None:
            _name("warmup input", "input_data_file", self.input_data_file)
        sources = [bool(self.zero_data), bool(self.random_data), self.input_data_file is not None]
        if sum(sources) != 1:
            _fail("warmup input", "set exactly one of zero_data, random_data, input_data_file")
        _set(self, "zero_data", sources[0])
        _set(self, "random_data", sources[1])


@dataclass(frozen=True)
class ModelWarmup:
    """One warm-up request sent when the model loads."""
    name: str
    batch_size: int
    inputs: dict[str, WarmupInput]

    def __post_init__(self) -> None:
        owner = f"warmup {self.name!r}"
        _name(owner, "name", self.name)
        _set(self, "batch_size", _int(owner, "batch_size", self.batch_size, 1))
        if not isinstance(self.inputs, Mapping) or not self.inputs:
            _fail(owner, "inputs must be a non-empty mapping of input name to WarmupInput")
        for key, value in self.inputs.items():
            _name(owner, "input name", key)
            if not isinstance(value, WarmupInput):
                _fail(owner, f"inputs[{key!r}] must be a WarmupInput, got {type(value).__name__}")
        _set(self, "inputs", dict(self.inputs))


@dataclass(frozen=True)
class ModelConfig:
    """A whole Triton model configuration (config.pbtxt)."""
    name: str
    max_batch_size: int = 0
    backend: str | None = None
    platform: str | None = None
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    instance_groups: tuple[InstanceGroup, ...] = ()
    dynamic_batching: DynamicBatching | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    ensemble_steps: tuple[EnsembleStep, ...] = ()
    optimization: Optimization | None = None
    warmup: tuple[ModelWarmup, ...] = ()
    default_model_filename: str | None = None
    version_policy_latest: int | None = None

    @property
    def is_ensemble(self) -> bool:
        return self.platform == ENSEMBLE_PLATFORM or bool(self.ensemble_steps)

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        _name(owner, "name", self.name)
        _set(self, "max_batch_size", _int(owner, "max_batch_size", self.max_batch_size, 0))
        for what, kind in (("inputs", TensorConfig), ("outputs", TensorConfig), ("warmup", ModelWarmup),
                           ("instance_groups", InstanceGroup), ("ensemble_steps", EnsembleStep)):
            _set(self, what, _items(owner, what, getattr(self, what), kind))
        _set(self, "parameters", _str_map(owner, "parameters", self.parameters))
        for what, kind in (("dynamic_batching", DynamicBatching), ("optimization", Optimization)):
            if getattr(self, what) is not None and not isinstance(getattr(self, what), kind):
                _fail(owner, f"{what} must be a {kind.__name__} or None")
        if self.default_model_filename is not None:
            _name(owner, "default_model_filename", self.default_model_filename)
        if self.version_policy_latest is not None:
            _set(self, "version_policy_latest", _int(owner, "version_policy_latest", self.version_policy_latest, 1))
        self._check_runtime(owner)
        self._check_tensors(owner)
        self._check_batching(owner)
        self._check_warmup(owner)
        if self.is_ensemble:
            _check_ensemble_wiring(self, owner)

    def _check_runtime(self, owner: str) -> None:
        for what in ("backend", "platform"):
            if getattr(self, what) is not None:
                _name(owner, what, getattr(self, what))
        if self.is_ensemble:
            if self.platform != ENSEMBLE_PLATFORM or self.backend is not None:
                _fail(owner, f'an ensemble needs platform "{ENSEMBLE_PLATFORM}" and no backend '
                             f"(got backend={self.backend!r}, platform={self.platform!r})")
            if not self.ensemble_steps:
                _fail(owner, f'platform "{ENSEMBLE_PLATFORM}" needs at least one ensemble step')
            if self.instance_groups or self.dynamic_batching is not None:
                _fail(owner, "an ensemble cannot have instance groups or dynamic batching; "
                             "set them on its composing models")
        elif (self.backend is None) == (self.platform is None):
            _fail(owner, f"set exactly one of backend or platform (got backend={self.backend!r}, "
                         f"platform={self.platform!r})")
        if self.backend == "tensorrt" or self.platform == "tensorrt_plan":
            if any(g.kind == "KIND_CPU" for g in self.instance_groups):
                _fail(owner, "TensorRT models run on GPUs only; use KIND_GPU instance groups")

    def _check_tensors(self, owner: str) -> None:
        for what, tensors in (("input", self.inputs), ("output", self.outputs)):
            seen: set[str] = set()
            for tensor in tensors:
                if tensor.name in seen:
                    _fail(owner, f"duplicate {what} tensor name {tensor.name!r}")
                seen.add(tensor.name)
                if tensor.reshape == () and self.max_batch_size == 0:
                    _fail(owner, f"{what} {tensor.name!r}: an empty reshape needs max_batch_size > 0")
        for tensor in self.outputs:
            if tensor.optional:
                _fail(owner, f"output {tensor.name!r} cannot be optional; only inputs can")

    def _check_batching(self, owner: str) -> None:
        batching = self.dynamic_batching
        if batching is None:
            return
        if self.max_batch_size == 0:
            _fail(owner, "dynamic batching needs max_batch_size > 0 (the model must support batching)")
        too_big = [b for b in batching.preferred_batch_size if b > self.max_batch_size]
        if too_big:
            _fail(owner, f"preferred_batch_size {too_big} exceeds max_batch_size {self.max_batch_size}")

    def _check_warmup(self, owner: str) -> None:
        declared = {t.name: t for t in self.inputs}
        for warmup in self.warmup:
            if warmup.batch_size > max(self.max_batch_size, 1):
                _fail(owner, f"warmup {warmup.name!r} batch_size {warmup.batch_size} exceeds "
                             f"max_batch_size {self.max_batch_size} (non-batching models warm up with 1)")
            for name, data in warmup.inputs.items():
                if declared and name not in declared:
                    _fail(owner, f"warmup {warmup.name!r} feeds {name!r}, which is not a model input "
                                 f"({sorted(declared)})")
                if name in declared and declared[name].data_type != data.data_type:
                    _fail(owner, f"warmup {warmup.name!r} input {name!r} is {data.data_type}, "
                                 f"the model input is {declared[name].data_type}")


def _check_ensemble_wiring(config: ModelConfig, owner: str) -> None:
    """Every step input must exist, every ensemble output must be produced, each tensor once, no cycles."""
    inputs = {t.name for t in config.inputs}
    if not config.outputs:
        _fail(owner, "an ensemble must declare at least one output")
    labels = [f"step {i} ({s.model_name})" for i, s in enumerate(config.ensemble_steps)]
    producer: dict[str, str] = {}
    for label, step in zip(labels, config.ensemble_steps):
        for model_output, tensor in step.output_map.items():
            if tensor in inputs:
                _fail(owner, f"{label} writes its output {model_output!r} to {tensor!r}, "
                             "which is already an ensemble input")
            if tensor in producer:
                _fail(owner, f"tensor {tensor!r} is produced twice: by {producer[tensor]} and {label}")
            producer[tensor] = label
    for label, step in zip(labels, config.ensemble_steps):
        for model_input, tensor in step.input_map.items():
            if tensor not in inputs and tensor not in producer:
                _fail(owner, f"{label} reads {tensor!r} for its input {model_input!r}, but that is neither "
                             f"an ensemble input {sorted(inputs)} nor any step's output {sorted(producer)}")
    for tensor in config.outputs:
        if tensor.name not in producer:
            _fail(owner, f"ensemble output {tensor.name!r} is not produced by any step "
                         f"(step outputs: {sorted(producer)})")
    available, pending = set(inputs), list(zip(labels, config.ensemble_steps))
    while pending:
        ready = [(label, s) for label, s in pending if set(s.input_map.values()) <= available]
        if not ready:
            _fail(owner, f"steps {[label for label, _ in pending]} wait on each other's outputs (a cycle)")
        for label, step in ready:
            available.update(step.output_map.values())
        pending = [p for p in pending if p not in ready]
