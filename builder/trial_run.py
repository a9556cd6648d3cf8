"""Validation by a trial run: `edgestack build` runs the spec's model once in ONNX Runtime on a sample image at
the spec's input size (through the server's own preprocess) and checks every output against the declared format.

The graph's declared shapes cannot tell a wrong format when its output dimensions are dynamic ([B, N, K] with
symbolic N and K), nor whether a model with a dynamic input size (a TF OD API SSD) runs at the spec's size; the
trial run can. A misfit is refused with the field (model.output.format, or the option), what the model gave, and
which registered formats fit it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats import FORMATS, DecodeOptions, OutputFormat
from backends.preprocess.image_ops import prepare_input
from builder.errors import BuilderError
from builder.model_inspect import ModelInterface, inspect_onnx
from builder.spec import PipelineSpec

SAMPLE_SEED = 12


@dataclass(frozen=True)
class TrialOutputs:
    """What the trial run fed and got: the input batch's shape and dtype, and each named output."""

    input_shape: tuple[int, ...]
    input_dtype: str
    outputs: dict[str, np.ndarray]

    def describe(self) -> str:
        return ", ".join(f"{name!r} {array.dtype} {list(array.shape)}" for name, array in self.outputs.items())


def sample_batch(spec: PipelineSpec, batch: int) -> np.ndarray:
    """batch copies of one seeded noise image, preprocessed as the server does for the spec's input."""
    rgb = np.random.default_rng(SAMPLE_SEED).integers(0, 256, (spec.input.height, spec.input.width, 3), np.uint8)
    tensor, _ = prepare_input(rgb, spec.input)
    return np.ascontiguousarray(np.repeat(tensor[None], batch, axis=0))


def run_model(spec: PipelineSpec, interface: ModelInterface, *, threads: int = 1) -> TrialOutputs:
    """The spec's output tensors for a sample batch (the graph's fixed batch, else 1); BuilderError naming the
    input when the model cannot run on it."""
    from backends.detector.onnx_runner import make_session  # onnxruntime only where a build runs

    batch = sample_batch(spec, interface.fixed_batch or 1)
    try:
        session = make_session(str(spec.model_path), threads)
        outputs = session.run(list(spec.output.names), {spec.input_name: batch})
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own Fail/InvalidArgument/RuntimeException
        raise BuilderError(f"trial run: {spec.model_path.name} does not run on a sample input {list(batch.shape)} "
                           f"{batch.dtype} at the spec's model.input size ({spec.input.layout} {spec.input.height}x"
                           f"{spec.input.width}): {_first_line(exc)}") from None
    return TrialOutputs(tuple(batch.shape), str(batch.dtype), dict(zip(spec.output.names, map(np.asarray, outputs))))


def format_problem(fmt: OutputFormat, outputs: Sequence[np.ndarray], num_classes: int,
                   options: Optional[DecodeOptions]) -> Optional[str]:
    """Why a batch of outputs does not fit fmt (shape check, then decoding the first image), or None."""
    if len(outputs) != len(fmt.outputs):
        return f"format {fmt.name!r} reads {len(fmt.outputs)} tensor(s) ({', '.join(fmt.outputs)}), got {len(outputs)}"
    batch = len(outputs[0]) if outputs[0].ndim else 0
    for role, array in zip(fmt.outputs, outputs):
        if array.ndim == 0 or len(array) != batch:
            return f"{role} {list(array.shape)} has no batch dimension of {batch} like the others"
    problem = fmt.check_shapes([tuple(a.shape) for a in outputs], num_classes)
    if problem:
        return problem
    try:
        fmt.decode([a[0] for a in outputs], num_classes, score_threshold=None, options=options)
    except (InvalidTensorError, ValueError, IndexError) as exc:
        return _first_line(exc)
    return None


def fitting_formats(outputs: Sequence[np.ndarray], spec: PipelineSpec) -> list[str]:
    """The registered formats (with their own default options) that read these outputs, in registry order."""
    fits = []
    for fmt in FORMATS.values():
        try:
            options = fmt.decode_options({}, spec.input.height, spec.input.width)
        except ValueError:
            continue
        if format_problem(fmt, outputs, len(spec.classes), options) is None:
            fits.append(fmt.name)
    return fits


def check_trial_run(spec: PipelineSpec, interface: Optional[ModelInterface] = None, *, threads: int = 1) -> TrialOutputs:
    """Run the spec's model once and refuse (BuilderError) outputs its model.output does not describe."""
    interface = interface or inspect_onnx(spec.model_path)
    trial = run_model(spec, interface, threads=threads)
    outputs = list(trial.outputs.values())
    fmt = FORMATS[spec.output.format]
    if interface.fixed_batch is None and any(a.ndim == 0 or len(a) != trial.input_shape[0] for a in outputs):
        raise BuilderError(f"trial run: the model's outputs {trial.describe()} for a batch of {trial.input_shape[0]} "
                           "do not all start with the batch dimension; Triton batches every output")
    problem = format_problem(fmt, outputs, len(spec.classes), spec.decode_options)
    if problem is None:
        return trial
    fits = [name for name in fitting_formats(outputs, spec) if name != fmt.name]
    hint = (f"formats that read these outputs: {', '.join(fits)}" if fits else
            f"no registered format reads them with the spec's {len(spec.classes)} classes (known: "
            f"{', '.join(FORMATS)}); check the classes, model.output.names and the options")
    own = fmt.decode_options({}, spec.input.height, spec.input.width)
    if format_problem(fmt, outputs, len(spec.classes), own) is None:
        changed = [name for name in fmt.options if getattr(own, name) != getattr(spec.decode_options, name)]
        hint = (f"format {fmt.name!r} reads them with its default options ({_options(fmt, own)}); check "
                + ", ".join(f"model.output.{name}" for name in changed or fmt.options))
    raise BuilderError(f"model.output.format {fmt.name!r} does not fit the model: a trial run on a sample input "
                       f"{list(trial.input_shape)} {trial.input_dtype} gave {trial.describe()}: {problem}; {hint}")


def _options(fmt: OutputFormat, options: DecodeOptions) -> str:
    return ", ".join(f"{name}: {getattr(options, name)}" for name in fmt.options) or "none"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
