"""Pipeline spec: one YAML file names the model, its input/output conventions, classes and thresholds.

Loading validates everything a server would otherwise discover at request time: paths exist, the
model's tensors exist with the declared name and shape, the class list matches the model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from backends.common.settings import DecodeLimits as Limits
from backends.common.settings import InputSpec, RouterSettings, Thresholds
from backends.postprocess.formats import FORMATS, OPTION_FIELDS, DecodeOptions
from builder.errors import SpecError
from builder.pipeline_choice import PipelineChoice, parse_pipeline
from builder.targets import TARGETS

OUTPUT_FORMATS = tuple(FORMATS)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


@dataclass(frozen=True)
class OutputSpec:
    """The model's output tensors, one per role of the format (formats.OutputFormat.outputs). `name` names the
    tensor of a one-output format (and wins over `names` there); `names` maps every role to its tensor
    ({role: tensor}, or a list in the format's role order). After loading, `names` lists the tensors in role
    order and `name` is the tensor of a one-output format ("" for several)."""

    name: str = ""
    format: str = "detections"
    names: tuple[str, ...] = ()
    # How the tensors encode boxes and classes (formats.DecodeOptions); None: the format's own convention.
    box_encoding: str | None = None  # xyxy | yxyx | cxcywh
    normalized: bool | None = None  # boxes in [0, 1] of the model input instead of pixels
    class_offset: int | None = None  # subtracted from the model's class ids: 1 where 0 is background
    strides: tuple[int, ...] | None = None  # yolox: the head's grid strides
    score_activation: str | None = None  # rtdetr: sigmoid | none

    def decode_options(self, input_height: int, input_width: int) -> DecodeOptions:
        """The format's DecodeOptions with this spec's values over its defaults, for a model input of that size."""
        given = {name: getattr(self, name) for name in OPTION_FIELDS}
        try:
            return FORMATS[self.format].decode_options(given, input_height, input_width)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"model.output: {exc}") from None

    def __post_init__(self) -> None:
        _require(self.format in FORMATS, f"model.output.format {self.format!r} is not one of: " + "; ".join(
            f"{f.name} ({f.summary})" for f in FORMATS.values()))
        roles = FORMATS[self.format].outputs
        names = self.names
        if isinstance(names, Mapping):
            unknown, missing = sorted(set(names) - set(roles)), [r for r in roles if r not in names]
            _require(not unknown and not missing, f"model.output.names must map the roles of format {self.format!r} "
                     f"({', '.join(roles)}) to model tensors; unknown: {unknown}, missing: {missing}")
            names = tuple(names[role] for role in roles)
        names = tuple(names) if isinstance(names, (list, tuple)) else (names,)
        if len(roles) == 1:
            _require(bool(self.name) or bool(names), "model.output.name must name the model's output tensor")
            names = (self.name,) if self.name else names
        else:
            _require(not self.name, f"format {self.format!r} reads {len(roles)} tensors ({', '.join(roles)}): name "
                     "them with model.output.names {role: tensor}, not model.output.name")
        _require(len(names) == len(roles), f"model.output.names must name {len(roles)} tensor(s), one per role of "
                 f"format {self.format!r} ({', '.join(roles)}); got {list(names)}")
        _require(all(isinstance(n, str) and n for n in names), f"model.output.names must be tensor names, got {list(names)}")
        _require(len(set(names)) == len(names), f"model.output.names must name different tensors, got {list(names)}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "name", names[0] if len(roles) == 1 else "")
        self.decode_options(1, 1)  # refuses an option the format does not take, or an invalid value, by name


@dataclass(frozen=True)
class RuntimeSpec:
    """Serving knobs; None means the target profile decides."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    detector_instances: int | None = None
    preprocess_instances: int | None = None
    intra_op_threads: int | None = None
    detector_streams: int | None = None  # OpenVINO streams per detector instance (intel target)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _require(value is None or (isinstance(value, int) and value >= 0), f"runtime.{f.name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    model_path: Path
    input_name: str
    input: InputSpec
    output: OutputSpec
    classes: tuple[str, ...]
    thresholds: Thresholds = field(default_factory=Thresholds)
    limits: Limits = field(default_factory=Limits)
    router: RouterSettings = field(default_factory=RouterSettings)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    target: str = "cpu"
    pipeline: PipelineChoice = field(default_factory=PipelineChoice)  # which models serve it (ensembles/)

    def __post_init__(self) -> None:
        _require(bool(self.input_name), "model.input.name must name the model's input tensor")
        _require(self.name.replace("_", "").replace("-", "").isalnum(), f"name {self.name!r} must be letters, digits, '_' or '-'")
        _require(self.model_path.is_file(), f"model.path {self.model_path} does not exist")
        _require(len(self.classes) > 0, "classes must list at least one class name")
        _require(self.target in TARGETS, f"target {self.target!r} is not one of {TARGETS}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image's model input, without the batch dimension."""
        if self.input.layout == "NHWC":
            return (self.input.height, self.input.width, 3)
        return (3, self.input.height, self.input.width)

    @property
    def decode_options(self) -> DecodeOptions:
        """How postprocess reads the model's outputs: the format's conventions, the spec's overrides, the input size."""
        return self.output.decode_options(self.input.height, self.input.width)

    def replace(self, **changes: Any) -> "PipelineSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_path"] = str(self.model_path)
        second = data["pipeline"]["second"]
        if second and second.get("path") is not None:
            second["path"] = str(second["path"])
        return data


def _section(raw: Mapping[str, Any], key: str, cls: type, where: str, skip: tuple[str, ...] = ()) -> Any:
    values = raw.get(key) or {}
    _require(isinstance(values, Mapping), f"{where}{key} must be a mapping")
    values = {k: v for k, v in values.items() if k not in skip}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"{where}{key}: unknown field(s) {unknown}; known: {sorted(known)}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        message = str(exc)  # the settings classes name the field themselves ("thresholds.score must ...")
        raise SpecError(message if message.startswith(f"{where}{key}.") else f"{where}{key}: {message}") from exc


def _load_classes(value: Any, base: Path) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    _require(isinstance(value, str), "classes must be a list of names or a path to a names file")
    path = (base / value).resolve()
    _require(path.is_file(), f"classes file {path} does not exist")
    return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())


def _input_name(section: Any) -> str:
    """model.input.name, or "" (rejected by PipelineSpec) when absent; a non-mapping section fails in _section."""
    name = section.get("name") if isinstance(section, Mapping) else None
    return "" if name is None else str(name)


def parse_spec(raw: Mapping[str, Any], base_dir: Path) -> PipelineSpec:
    """Build a PipelineSpec from a parsed YAML mapping; relative paths resolve against base_dir."""
    _require(isinstance(raw, Mapping), "a spec must be a YAML mapping")
    # sampling: the learning loop's section, read by loop.pipeline_step.load_sampling (`edgestack loop build`)
    known = {"name", "model", "classes", "thresholds", "limits", "router", "runtime", "target", "pipeline", "sampling"}
    unknown = sorted(set(raw) - known)
    _require(not unknown, f"unknown top-level field(s) {unknown}; known: {sorted(known)}")
    model = raw.get("model")
    _require(isinstance(model, Mapping) and "path" in model, "model.path is required")
    unknown_model = sorted(set(model) - {"path", "input", "output"})
    _require(not unknown_model, f"model: unknown field(s) {unknown_model}; known: ['input', 'output', 'path']")
    _require("classes" in raw, "classes is required (a list or a names file)")
    name = str(raw.get("name", "detect"))
    router = _section(raw, "router", RouterSettings, "")
    if (raw.get("router") or {}).get("cloud_model") is None:  # the cloud serves the same pipeline by default
        router = dataclasses.replace(router, cloud_model=name)
    return PipelineSpec(
        name=name,
        model_path=(base_dir / str(model["path"])).resolve(),
        input_name=_input_name(model.get("input")),
        input=_section(model, "input", InputSpec, "model.", skip=("name",)),
        output=_section(model, "output", OutputSpec, "model."),
        classes=_load_classes(raw["classes"], base_dir),
        thresholds=_section(raw, "thresholds", Thresholds, ""),
        limits=_section(raw, "limits", Limits, ""),
        router=router,
        runtime=_section(raw, "runtime", RuntimeSpec, ""),
        target=str(raw.get("target", "cpu")),
        pipeline=parse_pipeline(raw.get("pipeline"), base_dir),
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {path} is not valid YAML: {exc}") from exc


def load_spec(path: str | Path) -> PipelineSpec:
    path = Path(path)
    return parse_spec(_read_yaml(path), path.parent.resolve())


def spec_name(path: str | Path) -> str:
    """The pipeline name a spec gives (the ensemble clients call), read without loading its model or classes."""
    raw = _read_yaml(Path(path))
    _require(isinstance(raw, Mapping), "a spec must be a YAML mapping")
    return str(raw.get("name", "detect"))
