"""Render a complete, self-contained Triton model repository for a pipeline spec and a target.

Layout (model names prefixed with the pipeline name so several pipelines can share a repository):

    <out>/<name>_preprocess/{config.pbtxt, 1/model.py, 1/backends/...}
    <out>/<name>_detector/{config.pbtxt, 1/model.onnx (+ model.py on CPU), or model.xml + model.bin + model.py (intel), or model.plan}
    <out>/<name>_postprocess/...
    <out>/<name>_router/...
    <out>/<name>/{config.pbtxt, 1/}          the ensemble clients call
    <out>/<name>.pipeline.json               the resolved spec, the source model's pipeline settings and model hash
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from backends.common import tensors as T
from backends.common.files import sha256_file
from backends.postprocess.formats import get_format
from builder import steps
from builder.errors import BuilderError, TargetError
from builder.input_fusion import fuse_input_conversion
from builder.model_inspect import ModelInterface, inspect_onnx
from builder.settings import detector_model_filename, fuses_input, pipeline_settings
from builder.spec import PipelineSpec
from builder.targets import TargetProfile, make_target
from builder.trial_run import check_trial_run
from builder.triton_config import ModelConfig
from builder.triton_config_render import write_config

if TYPE_CHECKING:
    from builder.optimize.variants import Variant

BACKENDS_SOURCE = Path(__file__).resolve().parent.parent / "backends"
PIPELINE_FILE_SUFFIX = ".pipeline.json"


def target_for(spec: PipelineSpec, **overrides: object) -> TargetProfile:
    """The spec's target profile with the spec's runtime section applied, then explicit overrides."""
    runtime = spec.runtime
    merged: dict[str, object] = {
        "max_batch_size": runtime.max_batch_size,
        "max_queue_delay_us": runtime.max_queue_delay_us,
        "detector_instances": runtime.detector_instances,
        "preprocess_instances": runtime.preprocess_instances,
        "intra_op_threads": runtime.intra_op_threads,
        "detector_streams": runtime.detector_streams,
    }
    merged.update({k: v for k, v in overrides.items() if v is not None})
    target = make_target(spec.target, **merged)
    if merged["preprocess_instances"] is None and not target.on_gpu:
        target = dataclasses.replace(target, preprocess_instances=preprocess_instances_for(target))
    return target


def preprocess_instances_for(target: TargetProfile) -> int:
    """CPU preprocess instances when the spec does not say: one more than the detector's, so an image being decoded
    (up to DecodeLimits.max_request_pixels per request) holds one instance while the others keep the detectors fed."""
    return target.detector_instances + 1


def check_interface(spec: PipelineSpec, interface: ModelInterface) -> None:
    """Fail at build time when the spec does not describe the model file."""
    if spec.input_name not in interface.inputs:
        raise BuilderError(f"model has no input {spec.input_name!r}; its inputs: {sorted(interface.inputs)}")
    missing = [name for name in spec.output.names if name not in interface.outputs]
    if missing:
        raise BuilderError(f"model has no output {missing[0]!r}; its outputs: {sorted(interface.outputs)}")
    model_in = interface.inputs[spec.input_name]
    expected = spec.input_shape
    actual = model_in.shape[1:]
    if len(actual) != 3 or any(a not in (-1, e) for a, e in zip(actual, expected)):
        raise BuilderError(
            f"model input {spec.input_name!r} has shape {model_in.shape}, but the spec's "
            f"{spec.input.layout} {spec.input.height}x{spec.input.width} needs [batch, {', '.join(map(str, expected))}]"
        )
    if model_in.dtype != spec.input.dtype:
        raise BuilderError(f"model input {spec.input_name!r} is {model_in.dtype}, the spec says {spec.input.dtype}")
    problem = get_format(spec.output.format).check_shapes([interface.outputs[n].shape for n in spec.output.names],
                                                          len(spec.classes))
    if problem:
        raise BuilderError(f"{', '.join(map(repr, spec.output.names))}: {problem}")


def _copy_python_model(step: str, version_dir: Path) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BACKENDS_SOURCE / step / "model.py", version_dir / "model.py")
    shutil.copytree(
        BACKENDS_SOURCE,
        version_dir / "backends",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "model.py"),
    )


def _write_model(out: Path, config: ModelConfig, python_step: str | None) -> Path:
    model_dir = out / config.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if python_step is not None:
        _copy_python_model(python_step, version_dir)
    write_config(config, model_dir)
    return model_dir


# Which detector engines serve a variant of each runtime.
VARIANT_ENGINES = {
    "onnxruntime": ("python_onnxruntime", "onnxruntime_onnx"),
    "openvino": ("python_openvino",),
    "tensorrt": ("tensorrt_plan",),
}


def target_for_variant(target: TargetProfile, variant: "Variant") -> TargetProfile:
    """The target that serves variant, or TargetError when it cannot. A TensorRT plan needs the
    tensorrt_plan engine, so a GPU target on its default onnxruntime_onnx engine is switched to it."""
    if target.name not in variant.targets:
        raise TargetError(f"variant {variant.name} ({variant.runtime}, {variant.precision}) is built for target(s) "
                          f"{', '.join(variant.targets)}, not {target.name}; render with --target "
                          f"{variant.targets[0]} or build a variant for {target.name}")
    engines = VARIANT_ENGINES[variant.runtime]
    if target.detector_engine in engines:
        return target
    if variant.runtime == "tensorrt" and target.detector_engine == "onnxruntime_onnx":
        return dataclasses.replace(target, detector_engine="tensorrt_plan")
    raise TargetError(f"variant {variant.name} is a {variant.runtime} model; target {target.name} runs the detector "
                      f"with {target.detector_engine}, which needs one of: "
                      f"{', '.join(r for r, e in VARIANT_ENGINES.items() if target.detector_engine in e)}")


def _check_openvino_ir(spec: PipelineSpec, xml: Path) -> None:
    """The IR has the spec's input (same item shape) and output; read without compiling."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    inputs = {n: port for port in model.inputs for n in port.get_names()}
    outputs = {n for port in model.outputs for n in port.get_names()}
    if spec.input_name not in inputs:
        raise BuilderError(f"OpenVINO variant {xml} has no input {spec.input_name!r}; its inputs: {sorted(inputs)}")
    missing = [name for name in spec.output.names if name not in outputs]
    if missing:
        raise BuilderError(f"OpenVINO variant {xml} has no output {missing[0]!r}; its outputs: {sorted(outputs)}")
    shape = inputs[spec.input_name].get_partial_shape()
    item = tuple(d.get_length() if d.is_static else -1 for d in list(shape)[1:])
    if len(item) != 3 or any(a not in (-1, e) for a, e in zip(item, spec.input_shape)):
        raise BuilderError(f"OpenVINO variant {xml} input {spec.input_name!r} is {shape}; the spec needs [batch, "
                           f"{', '.join(map(str, spec.input_shape))}]")


def variant_record(variant: "Variant") -> dict:
    """What <name>.pipeline.json says of a served variant: how it was built, its files' hashes, and the device
    classes and build manifest `edgestack optimize` saved with it (variant.json), if any, which `bundle create`
    signs for the detector it bundles from this repository."""
    from builder.optimize.variants import VARIANT_FILE

    path = variant.path.parent / VARIANT_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "name": variant.name, "runtime": variant.runtime, "precision": variant.precision,
        "options": variant.options, "targets": list(variant.targets),
        "files_sha256": {f.name: sha256_file(f) for f in variant.files()},
        **{key: saved[key] for key in ("device_classes", "manifest") if saved.get(key)},
    }


def _check_variant(spec: PipelineSpec, variant: "Variant") -> None:
    missing = [str(f) for f in variant.files() if not f.is_file()]
    if missing:
        raise BuilderError(f"variant {variant.name} is incomplete, missing: {missing}")
    if variant.runtime == "onnxruntime":
        check_interface(spec, inspect_onnx(variant.path))
    elif variant.runtime == "openvino":
        _check_openvino_ir(spec, variant.path)


def _write_detector_model(spec: PipelineSpec, target: TargetProfile, variant: "Variant | None", version_dir: Path) -> None:
    """The detector's model file(s): the spec's ONNX model, or the variant's files, input-fused where
    the target moves the input conversion into an ONNX graph (the OpenVINO runner does its own)."""
    model_file = version_dir / detector_model_filename(target)
    source = spec.model_path if variant is None else variant.path
    if target.detector_engine == "python_openvino":
        shutil.copy2(source, model_file)
        shutil.copy2(source.with_suffix(".bin"), model_file.with_suffix(".bin"))
    elif fuses_input(spec, target):
        fuse_input_conversion(source, model_file, spec.input_name, spec.input)
    else:
        shutil.copy2(source, model_file)


def render_repository(spec: PipelineSpec, out: Path, target: TargetProfile | None = None,
                      variant: "Variant | None" = None) -> Path:
    """Write the repository for spec into out (replacing only this pipeline's models) and return out.

    variant: a built model variant (builder/optimize) served instead of the spec's model; it must list
    the target among its targets. The interface checks and configs still come from the spec's source
    ONNX model; the variant is checked to have the same input and output.

    Everything is first rendered into a temporary folder beside out, so a failure never leaves a
    half-written model behind.
    """
    target = target or target_for(spec)
    if variant is not None:
        target = target_for_variant(target, variant)
    interface = inspect_onnx(spec.model_path)
    check_interface(spec, interface)
    check_trial_run(spec, interface)  # runs the model once: outputs the declared format does not read are refused
    if variant is not None:
        _check_variant(spec, variant)
    configs = steps.pipeline_configs(spec, target, interface)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-render-", dir=out.parent) as tmp:
        staging = Path(tmp) / "repository"
        staging.mkdir()
        if variant is None and target.detector_engine == "python_openvino":
            # No IR given: convert the spec's model (FP32, a second or two) and serve that.
            from builder.optimize.openvino_variants import build_openvino

            variant = build_openvino(spec.model_path, Path(tmp) / "ov-fp32", "fp32")
        _write_model(staging, configs.preprocess, "preprocess")
        detector_dir = _write_model(staging, configs.detector, "detector" if target.python_detector else None)
        _write_detector_model(spec, target, variant, detector_dir / "1")
        _write_model(staging, configs.postprocess, "postprocess")
        _write_model(staging, configs.router, "router")
        _write_model(staging, configs.ensemble, None)
        pipeline = {
            "spec": spec.to_dict(),
            "settings": pipeline_settings(spec).to_dict(),  # what golden sets run the source model with
            "target": asdict(target),
            "model_sha256": sha256_file(spec.model_path),
            "ensemble": configs.ensemble.name,
            "outputs": [T.BOXES, T.SCORES, T.CLASS_IDS, T.CLASS_NAMES, T.NUM_DETECTIONS, T.SOURCE, T.DEGRADED, T.STATUS],
        }
        if variant is not None:
            pipeline["variant"] = variant_record(variant)
        publish_staging(staging, out, spec.name, pipeline)
    return out


def publish_staging(staging: Path, out: Path, name: str, pipeline: dict) -> None:
    """Write <name>.pipeline.json into the staged repository, then move each staged entry over its namesake in
    `out` (models of other pipelines in `out` stay)."""
    (staging / f"{name}{PIPELINE_FILE_SUFFIX}").write_text(json.dumps(pipeline, indent=2, sort_keys=True, default=str))
    for item in sorted(staging.iterdir()):
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        item.rename(dest)
