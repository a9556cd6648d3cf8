"""The settings the builder hands each Python-backend step, typed: one home for what they hold and mean.

The builder writes them as JSON into each step's config.pbtxt parameter `config` (to_json); the step's
model.py reads them back (from_model_config), and so do the sidecar's health gate, golden sets and the
optimizer's evaluation, which run the same pipeline functions in process. builder/settings.py derives them
from a PipelineSpec. Reading validates: a missing, unknown or invalid field is a SettingsError naming it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, TypeVar

import numpy as np

from backends.common.geometry import RESIZE_MODES
from backends.common.tensors import CONFIG_PARAMETER
from backends.errors import SettingsError
from backends.postprocess.formats import FORMATS, DecodeOptions

RUNTIMES = ("onnxruntime", "openvino")

S = TypeVar("S", bound="JsonSettings")


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 8192
    min_side: int = 16
    # Pixels one request may decode over all its images (JPEGs count at their reduced draft size): later images
    # past it fail alone, so one request cannot hold a preprocess instance for long.
    max_request_pixels: int = 64_000_000
    # Images decoding more pixels than this are decoded one at a time per model (all its instances); another one
    # arriving meanwhile fails at once as busy (UNAVAILABLE, retry), so a flood of them cannot stall the others.
    large_pixels: int = 16_000_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "min_side", "max_request_pixels", "large_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")
        if self.min_side > self.max_side:
            raise ValueError(f"DecodeLimits.min_side {self.min_side} is over max_side {self.max_side}")


@dataclass(frozen=True)
class InputSpec:
    """Model input format. Each channel (in channel_order) becomes (pixel * scale - mean) / std."""

    height: int
    width: int
    layout: str = "NHWC"
    channel_order: str = "RGB"
    dtype: str = "float32"
    resize: str = "stretch"
    pad_value: int = 114
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"InputSpec.{name} must be a positive integer, got {value!r}")
        for name, allowed in (
            ("layout", ("NHWC", "NCHW")),
            ("channel_order", ("RGB", "BGR")),
            ("dtype", ("float32", "float16", "uint8")),
            ("resize", RESIZE_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"InputSpec.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, int) or not 0 <= self.pad_value <= 255:
            raise ValueError(f"InputSpec.pad_value must be an integer in 0..255, got {self.pad_value!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"InputSpec.scale must be a positive finite number, got {self.scale!r}")
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"InputSpec.{name} must be 3 finite numbers, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise ValueError(f"InputSpec.std must be positive, got {self.std!r}")
        if self.dtype == "uint8" and self.affine() is not None:
            raise ValueError("InputSpec with dtype uint8 needs scale=1, mean=(0, 0, 0) and std=(1, 1, 1)")

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel float64 (a, b) with value = pixel * a - b; None when the values are the pixels."""
        if self.scale == 1 and self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0):
            return None
        std = np.array(self.std)
        return self.scale / std, np.array(self.mean) / std


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _names(values: Any, what: str) -> tuple[str, ...]:
    names = (values,) if isinstance(values, str) else tuple(values)
    _require(bool(names) and all(isinstance(n, str) and n for n in names), f"{what} must be non-empty names, got {values!r}")
    _require(len(set(names)) == len(names), f"{what} must not repeat a name, got {list(names)}")
    return names


@dataclass(frozen=True)
class Thresholds:
    score: float = 0.35
    iou: float = 0.5
    max_detections: int = 100
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        _require(_is_number(self.score) and 0.0 <= self.score < 1.0, f"thresholds.score must be in [0, 1), got {self.score!r}")
        _require(_is_number(self.iou) and 0.0 < self.iou <= 1.0, f"thresholds.iou must be in (0, 1], got {self.iou!r}")
        _require(_is_count(self.max_detections, 1), f"thresholds.max_detections must be a positive integer, got {self.max_detections!r}")
        _require(isinstance(self.class_agnostic, bool), f"thresholds.class_agnostic must be true or false, got {self.class_agnostic!r}")


class JsonSettings:
    """to_json / from_json for a frozen dataclass; NESTED names the fields that hold a dataclass of their own."""

    NESTED: ClassVar[Mapping[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[S], data: Any, where: Optional[str] = None) -> S:
        return _build(cls, data, where or cls.__name__)

    @classmethod
    def from_json(cls: type[S], text: str, where: Optional[str] = None) -> S:
        where = where or cls.__name__
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{where}: not JSON: {exc}") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_model_config(cls: type[S], config: Mapping[str, Any] | str, model: str) -> S:
        """From a Triton model config, as JSON text (what Triton hands initialize()) or parsed."""
        if isinstance(config, str):
            config = json.loads(config)
        parameter = (config.get("parameters") or {}).get(CONFIG_PARAMETER) or {}
        raw = parameter.get("string_value") if isinstance(parameter, Mapping) else None
        if raw is None:
            raise SettingsError(f"model {model} has no '{CONFIG_PARAMETER}' parameter; re-render the repository")
        return cls.from_json(raw, f"settings of {model}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    _require(isinstance(data, Mapping), f"{where}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _require(not unknown, f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    missing = [name for name, f in fields.items()
               if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _require(not missing, f"{where}: missing field(s) {missing}")
    nested = getattr(cls, "NESTED", {})
    values = {}
    for name, value in data.items():
        if name in nested and value is not None:
            value = _build(nested[name], value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class RouterSettings(JsonSettings):
    """The router step: edge answers below min_confidence go to the cloud Triton, when one is configured."""

    cloud_url: Optional[str] = None
    cloud_model: str = "detect"
    min_confidence: float = 0.5
    deadline_ms: int = 500
    failure_threshold: int = 3
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        _require(_is_number(self.min_confidence) and 0.0 <= self.min_confidence <= 1.0,
                 f"router.min_confidence must be in [0, 1], got {self.min_confidence!r}")
        _require(_is_count(self.deadline_ms, 1), f"router.deadline_ms must be a positive integer, got {self.deadline_ms!r}")
        _require(_is_count(self.failure_threshold, 1),
                 f"router.failure_threshold must be a positive integer, got {self.failure_threshold!r}")
        _require(_is_number(self.cooldown_s) and self.cooldown_s > 0, f"router.cooldown_s must be positive, got {self.cooldown_s!r}")
        _require(isinstance(self.cloud_model, str) and bool(self.cloud_model), f"router.cloud_model must name a model, got {self.cloud_model!r}")
        if self.cloud_url is not None:
            host, sep, port = str(self.cloud_url).rpartition(":")
            _require(isinstance(self.cloud_url, str) and bool(sep and host and port.isdigit()),
                     f"router.cloud_url must be host:port (gRPC), got {self.cloud_url!r}")


@dataclass(frozen=True)
class PreprocessSettings(JsonSettings):
    """The preprocess step: what it emits (input) and which images it refuses (limits)."""

    NESTED: ClassVar[Mapping[str, type]] = {"input": InputSpec, "limits": DecodeLimits}

    input: InputSpec
    limits: DecodeLimits = DecodeLimits()

    def __post_init__(self) -> None:
        _require(isinstance(self.input, InputSpec), f"preprocess input must be an InputSpec, got {self.input!r}")
        _require(isinstance(self.limits, DecodeLimits), f"preprocess limits must be DecodeLimits, got {self.limits!r}")


@dataclass(frozen=True)
class DetectorSettings(JsonSettings):
    """The Python-backend detector: its model file in the version folder, the tensors it feeds and returns
    (output_names: one per role of the output format, in the format's order), and how it runs."""

    NESTED: ClassVar[Mapping[str, type]] = {"input_spec": InputSpec}

    model_file: str
    input_name: str
    output_names: tuple[str, ...]
    intra_op_threads: int
    fixed_batch: Optional[int] = None
    intra_op_spinning: bool = False  # ONNX Runtime only (onnx_runner.make_session)
    runtime: str = "onnxruntime"
    device: str = "CPU"  # OpenVINO only
    uint8_input: bool = False  # OpenVINO only: the compiled model converts uint8 pixels per input_spec
    input_spec: Optional[InputSpec] = None
    inference_precision: str = "f32"  # OpenVINO only
    streams: int = 1  # OpenVINO only: a batch of several images runs this many at once, one per stream

    def __post_init__(self) -> None:
        _require(_is_count(self.streams, 1), f"detector streams must be an integer >= 1, got {self.streams!r}")
        _require(isinstance(self.model_file, str) and bool(self.model_file), f"detector model_file must be a file name, got {self.model_file!r}")
        _require(isinstance(self.input_name, str) and bool(self.input_name), f"detector input_name must name a tensor, got {self.input_name!r}")
        object.__setattr__(self, "output_names", _names(self.output_names, "detector output_names"))
        _require(_is_count(self.intra_op_threads, 0), f"detector intra_op_threads must be an integer >= 0, got {self.intra_op_threads!r}")
        _require(self.fixed_batch is None or _is_count(self.fixed_batch, 1),
                 f"detector fixed_batch must be null or a positive integer, got {self.fixed_batch!r}")
        _require(self.runtime in RUNTIMES, f"detector runtime {self.runtime!r} is not one of {RUNTIMES}; re-render the repository")
        _require(isinstance(self.uint8_input, bool), f"detector uint8_input must be true or false, got {self.uint8_input!r}")
        _require(isinstance(self.intra_op_spinning, bool),
                 f"detector intra_op_spinning must be true or false, got {self.intra_op_spinning!r}")
        _require(self.input_spec is None or isinstance(self.input_spec, InputSpec), f"detector input_spec must be an InputSpec, got {self.input_spec!r}")
        for name in ("device", "inference_precision"):
            _require(isinstance(getattr(self, name), str), f"detector {name} must be a string, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: Any, where: Optional[str] = None) -> "DetectorSettings":
        """Also reads the one `output_name` of repositories rendered before detectors had several outputs: a
        new version folder may be installed beside such a config.pbtxt."""
        if isinstance(data, Mapping) and "output_name" in data and "output_names" not in data:
            data = {**{k: v for k, v in data.items() if k != "output_name"}, "output_names": [data["output_name"]]}
        return _build(cls, data, where or cls.__name__)


@dataclass(frozen=True)
class PostprocessSettings(JsonSettings):
    """The postprocess step: how the detector's outputs are decoded (format), named (classes) and filtered."""

    NESTED: ClassVar[Mapping[str, type]] = {"thresholds": Thresholds, "decode": DecodeOptions}

    format: str
    classes: tuple[str, ...]
    thresholds: Thresholds = Thresholds()
    decode: Optional[DecodeOptions] = None  # box encoding, class offset... (None: the format's defaults)

    def __post_init__(self) -> None:
        _require(self.format in FORMATS, f"postprocess format {self.format!r} is not one of {sorted(FORMATS)}")
        classes = tuple(self.classes) if isinstance(self.classes, (list, tuple)) else ()
        _require(bool(classes) and all(isinstance(c, str) for c in classes), f"postprocess classes must be a non-empty list of names, got {self.classes!r}")
        object.__setattr__(self, "classes", classes)
        _require(isinstance(self.thresholds, Thresholds), f"postprocess thresholds must be Thresholds, got {self.thresholds!r}")
        _require(self.decode is None or isinstance(self.decode, DecodeOptions),
                 f"postprocess decode must be DecodeOptions, got {self.decode!r}")

    @property
    def roles(self) -> tuple[str, ...]:
        """The detector output tensors the format reads, in its order."""
        return FORMATS[self.format].outputs

    def options(self, score_threshold: Optional[float] = None) -> dict[str, Any]:
        """backends.postprocess.pipeline.postprocess_image's keyword arguments; score_threshold replaces the
        settings' (evaluation keeps the low-score tail)."""
        t = self.thresholds
        return dict(num_classes=len(self.classes), score_threshold=t.score if score_threshold is None else score_threshold,
                    iou_threshold=t.iou, max_detections=t.max_detections, class_agnostic=t.class_agnostic,
                    options=self.decode)


@dataclass(frozen=True)
class PipelineSettings(JsonSettings):
    """The pipeline around one detector model, run in process (evaluation, golden sets): the model's input and
    output tensors (one per role of the format, in its order) and the settings of the steps around it."""

    NESTED: ClassVar[Mapping[str, type]] = {"preprocess": PreprocessSettings, "postprocess": PostprocessSettings}

    input_name: str
    output_names: tuple[str, ...]
    preprocess: PreprocessSettings
    postprocess: PostprocessSettings

    def __post_init__(self) -> None:
        _require(isinstance(self.input_name, str) and bool(self.input_name), f"input_name must name a tensor, got {self.input_name!r}")
        object.__setattr__(self, "output_names", _names(self.output_names, "output_names"))
        _require(len(self.output_names) == len(self.postprocess.roles),
                 f"format {self.postprocess.format!r} reads {len(self.postprocess.roles)} output(s) "
                 f"({', '.join(self.postprocess.roles)}), got {list(self.output_names)}")
