"""builder.repository + builder.steps + builder.model_inspect: the rendered Triton model repository."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from backends.common import tensors as T
from backends.common.settings import DetectorSettings
from builder import steps
from builder.errors import BuilderError, SpecError
from builder.model_inspect import DYNAMIC, inspect_onnx
from builder.repository import check_interface, render_repository, target_for
from builder.spec import load_spec
from builder.targets import make_target
from builder.triton_config import CONFIG_FILENAME
from builder.triton_config_parse import parse
from tests.conftest import MODEL

REPO = Path(__file__).resolve().parents[2]
SHIPPED_SPEC = REPO / "specs" / "centernet_coco.yaml"
FIXTURE_MODEL = MODEL
PYTHON_STEPS = ("preprocess", "postprocess", "router")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), hidden ones included."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def config_files(repo: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(repo.glob(f"*/{CONFIG_FILENAME}"))}


@pytest.fixture(scope="module")
def spec():
    return load_spec(SHIPPED_SPEC)


@pytest.fixture(scope="module")
def interface(spec):
    return inspect_onnx(spec.model_path)


@pytest.fixture(scope="module")
def cpu_repo(spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "repo"
    assert render_repository(spec, out) == out
    return out


@pytest.fixture(scope="module")
def cpu_configs(spec, interface):
    return steps.pipeline_configs(spec, target_for(spec), interface)


def model_names(spec) -> dict[str, str]:
    return {
        "preprocess": f"{spec.name}_preprocess",
        "detector": f"{spec.name}_detector",
        "postprocess": f"{spec.name}_postprocess",
        "router": f"{spec.name}_router",
        "ensemble": spec.name,
    }


# --- model_inspect ------------------------------------------------------------------------------


def test_inspect_fixture_model(interface):
    model_in = interface.inputs["tower_0/images:0"]
    assert model_in.dtype == "float32"
    assert model_in.shape == (1, 512, 512, 3)
    assert interface.outputs["tower_0/detections"].shape == (1, 100, 6)
    assert interface.fixed_batch == 1


def test_inspect_rejects_non_onnx(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"definitely not a protobuf \xff\xff\xff")
    with pytest.raises(SpecError):
        inspect_onnx(bogus)


def test_inspect_dynamic_batch(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph), str(path))
    info = inspect_onnx(path)
    assert info.inputs["x"].shape == (DYNAMIC, 4)
    assert info.fixed_batch is None


# --- CPU repository -----------------------------------------------------------------------------


def test_cpu_repository_layout(spec, cpu_repo):
    names = model_names(spec)
    dirs = sorted(p.name for p in cpu_repo.iterdir() if p.is_dir())
    assert dirs == sorted(names.values())
    for name in names.values():
        assert (cpu_repo / name / CONFIG_FILENAME).is_file()
        assert (cpu_repo / name / "1").is_dir()
    assert (cpu_repo / f"{spec.name}.pipeline.json").is_file()
    # the staging folder beside the output is gone
    assert [p.name for p in cpu_repo.parent.iterdir()] == ["repo"]


def test_config_round_trip_equals_pipeline_configs(spec, cpu_repo, cpu_configs):
    names = model_names(spec)
    for step, name in names.items():
        parsed = parse((cpu_repo / name / CONFIG_FILENAME).read_text())
        assert parsed == getattr(cpu_configs, step), step


def test_every_config_parses_as_triton_protobuf(cpu_repo):
    files = config_files(cpu_repo)
    assert len(files) == 5
    for model, raw in files.items():
        message = text_format.Parse(raw.decode(), model_config_pb2.ModelConfig())
        assert message.name == model


def test_ensemble_wiring(spec, cpu_repo, cpu_configs):
    names = model_names(spec)
    ensemble = parse((cpu_repo / spec.name / CONFIG_FILENAME).read_text())
    assert ensemble.platform == "ensemble"
    assert [t.name for t in ensemble.inputs] == [T.IMAGE]
    assert [t.name for t in ensemble.outputs] == [*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS]
    pre, det, post, router = ensemble.ensemble_steps
    assert [s.model_name for s in ensemble.ensemble_steps] == [
        names["preprocess"], names["detector"], names["postprocess"], names["router"]]
    assert pre.input_map == {T.IMAGE: T.IMAGE}
    assert pre.output_map == {T.PREPROCESSED: T.PREPROCESSED, T.TRANSFORM: T.TRANSFORM, T.STATUS: T.IMAGE_STATUS}
    assert det.input_map == {spec.input_name: T.PREPROCESSED}
    assert det.output_map == {spec.output.name: T.RAW_OUTPUT}
    assert post.input_map == {T.RAW_OUTPUT: T.RAW_OUTPUT, T.TRANSFORM: T.TRANSFORM}
    assert post.output_map == {edge: edge for edge in T.EDGE_TO_FINAL}
    assert router.input_map == {T.IMAGE: T.IMAGE, **{edge: edge for edge in T.EDGE_TO_FINAL}, T.IMAGE_STATUS: T.IMAGE_STATUS}
    assert router.output_map == {n: n for n in (*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS)}


def test_ensemble_maps_name_real_tensors_of_matching_types(cpu_repo, spec):
    """Each step's map keys are that model's tensors, and every tensor carries one dtype/shape end to end."""
    configs = {p.parent.name: parse(p.read_text()) for p in cpu_repo.glob(f"*/{CONFIG_FILENAME}")}
    ensemble = configs[spec.name]
    tensors = {t.name: (t.data_type, t.dims) for t in ensemble.inputs}
    for step in ensemble.ensemble_steps:
        model = configs[step.model_name]
        model_inputs = {t.name: t for t in model.inputs}
        model_outputs = {t.name: t for t in model.outputs}
        assert set(step.input_map) == set(model_inputs), step.model_name
        assert set(step.output_map) <= set(model_outputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert tensors[tensor] == (model_inputs[model_input].data_type, model_inputs[model_input].dims), tensor
        for model_output, tensor in step.output_map.items():
            tensors[tensor] = (model_outputs[model_output].data_type, model_outputs[model_output].dims)
    for out in ensemble.outputs:
        assert tensors[out.name] == (out.data_type, out.dims)


def test_python_models_carry_code_without_nested_model_files(spec, cpu_repo):
    names = model_names(spec)
    for step in (*PYTHON_STEPS, "detector"):  # on CPU the detector is a Python model too
        version = cpu_repo / names[step] / "1"
        model_py = version / "model.py"
        assert model_py.read_bytes() == (REPO / "backends" / step / "model.py").read_bytes()
        package = version / "backends"
        assert (package / "__init__.py").is_file()
        assert (package / "common" / "detections.py").is_file()
        assert (package / "detector" / "onnx_runner.py").is_file()
        assert list(package.rglob("model.py")) == []
        assert list(package.rglob("__pycache__")) == []
        assert list(package.rglob("*.pyc")) == []
        config = parse((cpu_repo / names[step] / CONFIG_FILENAME).read_text())
        assert config.backend == "python"


def test_ensemble_version_folder_is_empty(spec, cpu_repo):
    assert list((cpu_repo / spec.name / "1").iterdir()) == []


def test_cpu_detector_model_takes_uint8_and_matches_the_source(spec, cpu_repo):
    """On CPU the input conversion is fused into the graph: same outputs as the source on the same pixels."""
    import numpy as np
    import onnxruntime as ort

    fused_path = cpu_repo / f"{spec.name}_detector" / "1" / "model.onnx"
    fused = ort.InferenceSession(str(fused_path), providers=["CPUExecutionProvider"])
    source = ort.InferenceSession(str(FIXTURE_MODEL), providers=["CPUExecutionProvider"])
    assert fused.get_inputs()[0].type == "tensor(uint8)"
    pixels = np.random.default_rng(1).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    out_fused = fused.run([spec.output.name], {spec.input_name: pixels})[0]
    out_source = source.run([spec.output.name], {spec.input_name: pixels.astype(np.float32)})[0]
    np.testing.assert_array_equal(out_fused, out_source)


def test_gpu_detector_model_file_is_the_source(spec, tmp_path):
    gpu_spec = spec.replace(target="nvidia-gpu")
    out = render_repository(gpu_spec, tmp_path / "repo")
    assert sha256(out / f"{spec.name}_detector" / "1" / "model.onnx") == sha256(FIXTURE_MODEL)


def test_cpu_detector_config(spec, cpu_repo):
    detector = parse((cpu_repo / f"{spec.name}_detector" / CONFIG_FILENAME).read_text())
    settings = json.loads(detector.parameters[steps.CONFIG_PARAMETER])
    assert settings == {
        "model_file": "model.onnx",
        "input_name": spec.input_name,
        "output_names": [spec.output.name],
        "intra_op_threads": 1,
        "intra_op_spinning": False,
        "fixed_batch": 1,
        "runtime": "onnxruntime",
        "device": "CPU",
        "uint8_input": False,
        "input_spec": None,
        "inference_precision": "f32",
        "streams": 1,
    }
    assert DetectorSettings.from_json(detector.parameters[steps.CONFIG_PARAMETER]).output_names == (spec.output.name,)
    assert detector.max_batch_size == 8  # the Python runner splits batches for the fixed-batch graph
    assert [(g.kind, g.count) for g in detector.instance_groups] == [("KIND_CPU", 2)]
    # A fixed-batch-1 graph runs image by image: one request per execute(), no batching to wait on.
    assert detector.dynamic_batching is None
    assert [t.dims for t in detector.inputs] == [(512, 512, 3)]
    assert [t.dims for t in detector.outputs] == [(100, 6)]
    ensemble = parse((cpu_repo / spec.name / CONFIG_FILENAME).read_text())
    assert ensemble.max_batch_size == 8
    for step in ("preprocess", "postprocess", "router"):
        cfg = parse((cpu_repo / f"{spec.name}_{step}" / CONFIG_FILENAME).read_text())
        assert all(g.kind == "KIND_CPU" for g in cfg.instance_groups), step


def test_pipeline_json(spec, cpu_repo):
    data = json.loads((cpu_repo / f"{spec.name}.pipeline.json").read_text())
    assert data["model_sha256"] == sha256(FIXTURE_MODEL)
    assert data["ensemble"] == spec.name
    assert data["target"]["name"] == "cpu"
    assert data["spec"]["model_path"] == str(FIXTURE_MODEL)
    assert len(data["spec"]["classes"]) == 80
    assert data["outputs"] == [*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS]


def test_render_twice_is_byte_identical(spec, cpu_repo, tmp_path):
    again = render_repository(spec, tmp_path / "repo")
    first, second = config_files(cpu_repo), config_files(again)
    assert len(first) == 5
    assert first == second
    assert (cpu_repo / f"{spec.name}.pipeline.json").read_bytes() == (again / f"{spec.name}.pipeline.json").read_bytes()
    # and rendering over itself changes nothing either
    render_repository(spec, again)
    assert config_files(again) == first


def test_render_keeps_other_models_and_replaces_its_own(spec, tmp_path):
    out = tmp_path / "repo"
    other = out / "other_model"
    (other / "1").mkdir(parents=True)
    (other / CONFIG_FILENAME).write_text('name: "other_model"\nbackend: "python"\n')
    (other / "1" / "model.py").write_text("# another team's model\n")
    (out / "other.pipeline.json").write_text("{}")
    stale = out / f"{spec.name}_detector" / "1" / "stale.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from an older build")
    render_repository(spec, out)
    assert (other / CONFIG_FILENAME).read_text() == 'name: "other_model"\nbackend: "python"\n'
    assert (other / "1" / "model.py").read_text() == "# another team's model\n"
    assert (out / "other.pipeline.json").read_text() == "{}"
    assert not stale.exists()
    assert (out / f"{spec.name}_detector" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_two_pipelines_share_a_repository(spec, tmp_path):
    out = tmp_path / "repo"
    render_repository(spec, out)
    render_repository(spec.replace(name="people"), out)
    for name in ("detect", "people"):
        assert (out / name / CONFIG_FILENAME).is_file()
        assert (out / f"{name}_detector" / "1" / "model.onnx").is_file()
        assert (out / f"{name}.pipeline.json").is_file()
    people = parse((out / "people" / CONFIG_FILENAME).read_text())
    assert [s.model_name for s in people.ensemble_steps][0] == "people_preprocess"


# --- spec / model mismatches fail before anything is written ------------------------------------


def _mismatches(spec):
    from dataclasses import replace

    return {
        "wrong input name": spec.replace(input_name="images"),
        "wrong output name": spec.replace(output=replace(spec.output, name="tower_0/nothing")),
        "640x640": spec.replace(input=replace(spec.input, height=640, width=640)),
        "NCHW": spec.replace(input=replace(spec.input, layout="NCHW")),
        "uint8": spec.replace(input=replace(spec.input, dtype="uint8")),
        "yolov8 format": spec.replace(output=replace(spec.output, format="yolov8")),
    }


@pytest.mark.parametrize("case", ["wrong input name", "wrong output name", "640x640", "NCHW", "uint8", "yolov8 format"])
def test_mismatched_spec_fails_before_writing_into_empty_dir(spec, tmp_path, case):
    bad = _mismatches(spec)[case]
    out = tmp_path / "repo"
    out.mkdir()
    with pytest.raises(BuilderError):
        render_repository(bad, out)
    assert list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


@pytest.mark.parametrize("case", ["wrong input name", "640x640", "NCHW"])
def test_mismatched_spec_leaves_existing_repository_unchanged(spec, tmp_path, case):
    out = tmp_path / "repo"
    render_repository(spec, out)
    before = snapshot(out)
    with pytest.raises(BuilderError) as info:
        render_repository(_mismatches(spec)[case], out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    if case == "wrong input name":
        assert "'images'" in str(info.value)


def test_mismatched_spec_does_not_create_missing_output_dir(spec, tmp_path):
    out = tmp_path / "not" / "yet"
    with pytest.raises(BuilderError):
        render_repository(_mismatches(spec)["640x640"], out)
    assert not (tmp_path / "not").exists()


def test_check_interface_accepts_the_shipped_spec(spec, interface):
    check_interface(spec, interface)  # raises on any mismatch


def test_check_interface_messages(spec, interface):
    with pytest.raises(BuilderError) as info:
        check_interface(_mismatches(spec)["NCHW"], interface)
    assert "NCHW" in str(info.value) and "512" in str(info.value)
    with pytest.raises(BuilderError) as info:
        check_interface(_mismatches(spec)["uint8"], interface)
    assert "uint8" in str(info.value)


# --- GPU targets --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["nvidia-gpu", "jetson"])
def gpu_render(request, spec, tmp_path_factory):
    gpu_spec = spec.replace(target=request.param)
    target = target_for(gpu_spec)
    assert target == make_target(request.param)
    out = tmp_path_factory.mktemp(request.param) / "repo"
    render_repository(gpu_spec, out, target)
    return request.param, gpu_spec, out


def test_gpu_detector_is_native_onnxruntime_with_tensorrt(gpu_render):
    target_name, gpu_spec, out = gpu_render
    detector = parse((out / f"{gpu_spec.name}_detector" / CONFIG_FILENAME).read_text())
    assert detector.platform == "onnxruntime_onnx"
    assert detector.backend is None
    assert detector.default_model_filename == "model.onnx"
    assert detector.optimization is not None
    [accelerator] = detector.optimization.gpu_accelerators
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) == make_target(target_name).max_workspace_bytes
    assert detector.parameters == {}


def test_gpu_instance_groups(gpu_render):
    _, gpu_spec, out = gpu_render
    for step in ("detector", "preprocess"):
        cfg = parse((out / f"{gpu_spec.name}_{step}" / CONFIG_FILENAME).read_text())
        assert [g.kind for g in cfg.instance_groups] == ["KIND_GPU"], step
        assert cfg.instance_groups[0].gpus == (0,), step
    for step in ("postprocess", "router"):
        cfg = parse((out / f"{gpu_spec.name}_{step}" / CONFIG_FILENAME).read_text())
        assert [g.kind for g in cfg.instance_groups] == ["KIND_CPU"], step


def test_gpu_fixed_batch_caps_detector_and_ensemble(gpu_render):
    target_name, gpu_spec, out = gpu_render
    detector = parse((out / f"{gpu_spec.name}_detector" / CONFIG_FILENAME).read_text())
    ensemble = parse((out / gpu_spec.name / CONFIG_FILENAME).read_text())
    assert detector.max_batch_size == 1
    assert detector.dynamic_batching is None  # nothing to batch at 1
    assert ensemble.max_batch_size == 1
    preprocess = parse((out / f"{gpu_spec.name}_preprocess" / CONFIG_FILENAME).read_text())
    assert preprocess.max_batch_size == make_target(target_name).max_batch_size


def test_gpu_detector_folder_has_only_the_model(gpu_render):
    _, gpu_spec, out = gpu_render
    version = out / f"{gpu_spec.name}_detector" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx"]
    assert sha256(version / "model.onnx") == sha256(FIXTURE_MODEL)
    for step in PYTHON_STEPS:
        assert (out / f"{gpu_spec.name}_{step}" / "1" / "model.py").is_file()


def test_gpu_configs_round_trip_and_parse_as_protobuf(gpu_render, interface):
    _, gpu_spec, out = gpu_render
    configs = steps.pipeline_configs(gpu_spec, target_for(gpu_spec), interface)
    for step, name in model_names(gpu_spec).items():
        text = (out / name / CONFIG_FILENAME).read_text()
        text_format.Parse(text, model_config_pb2.ModelConfig())
        assert parse(text) == getattr(configs, step), step


def test_gpu_pipeline_json_names_target(gpu_render):
    target_name, gpu_spec, out = gpu_render
    data = json.loads((out / f"{gpu_spec.name}.pipeline.json").read_text())
    assert data["target"]["name"] == target_name
    assert data["spec"]["target"] == target_name


def test_tensorrt_plan_configs(spec, interface):
    target = make_target("nvidia-gpu", detector_engine="tensorrt_plan")
    gpu_spec = spec.replace(target="nvidia-gpu")
    assert steps.detector_model_filename(target) == "model.plan"
    configs = steps.pipeline_configs(gpu_spec, target, interface)
    detector = configs.detector
    assert detector.platform == "tensorrt_plan"
    assert detector.backend is None
    assert detector.default_model_filename == "model.plan"
    assert detector.optimization is None
    assert [g.kind for g in detector.instance_groups] == ["KIND_GPU"]
    assert detector.max_batch_size == 1
    assert configs.ensemble.max_batch_size == 1
    assert configs.ensemble.ensemble_steps[1].model_name == detector.name
    # the rendered text is valid Triton configuration and reads back the same
    from builder.triton_config_render import render

    text = render(detector)
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert message.platform == "tensorrt_plan" and message.default_model_filename == "model.plan"
    assert parse(text) == detector


def test_runtime_overrides_reach_configs(spec, interface):
    from dataclasses import replace

    tuned = spec.replace(runtime=replace(spec.runtime, detector_instances=3, max_batch_size=4, max_queue_delay_us=250))
    configs = steps.pipeline_configs(tuned, target_for(tuned), interface)
    assert configs.detector.instance_groups[0].count == 3
    assert configs.detector.max_batch_size == 4
    assert configs.preprocess.dynamic_batching.max_queue_delay_microseconds == 250
    assert configs.ensemble.max_batch_size == 4
