"""builder.optimize.openvino_variants, backends.detector.openvino_runner and serving an OpenVINO variant
(the intel target): IRs against the source ONNX model, NNCF INT8, the uint8 PrePostProcessor input,
render_repository with a variant."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from backends.common.settings import DetectorSettings, PreprocessSettings
from backends.detector.onnx_runner import OnnxDetector, make_session
from backends.detector.openvino_runner import OpenVinoDetector, add_uint8_input, compile_config
from backends.detector.runners import make_detector
from backends.errors import InvalidTensorError
from backends.postprocess.pipeline import postprocess_image
from backends.preprocess.image_ops import InputSpec, decode_image, prepare_input
from builder import steps
from builder.device_class import host_class
from builder.errors import BuilderError, TargetError
from builder.input_fusion import transport_spec
from builder.model_inspect import inspect_onnx
from builder.optimize.openvino_variants import (
    _convert,
    build_openvino,
    build_openvino_int8,
    fold_transposes,
    postprocess_node_names,
)
from builder.optimize.int8_classes import SATURATING_X86, settings_for
from builder.optimize.variants import Variant, load_variant, save_variant
from builder.repository import render_repository, target_for
from builder.spec import load_spec
from builder.targets import IntelTarget, make_target
from builder.triton_config import CONFIG_FILENAME
from builder.triton_config_parse import parse
from tests.conftest import IMAGES, MODEL, SPEC
from tests.variants import OPENVINO_CALIBRATION_IMAGES, VariantCache

INPUT = "tower_0/images:0"
OUTPUT = "tower_0/detections"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def built(shared_variants):
    """ov-fp32, ov-fp16 and ov-int8 (NNCF on the first 5 fixture photos) of the fixture model; ov-int8 with this
    CPU class's overflow fix (`edgestack optimize`'s), int8-portable with the fix of x86 classes without VNNI
    (7-bit weights: exact on every x86 class, so its detections here are its detections on AVX2). Built once per
    session (tests/variants.py; test_openvino_served serves ov-fp32 and ov-int8): read-only here."""
    fix = settings_for(host_class()).openvino_overflow_fix
    return {
        "fp32": shared_variants.openvino("fp32"),
        "fp16": shared_variants.openvino("fp16"),
        "int8": shared_variants.openvino_int8(fix, OPENVINO_CALIBRATION_IMAGES),
        "calibration": shared_variants.calibration(OPENVINO_CALIBRATION_IMAGES),
        "int8-portable": shared_variants.openvino_int8(settings_for(SATURATING_X86[-1]).openvino_overflow_fix,
                                                       OPENVINO_CALIBRATION_IMAGES),
    }


@pytest.fixture(scope="module")
def onnx_fp32():
    return OnnxDetector(make_session(str(MODEL), intra_op_threads=1), INPUT, OUTPUT, fixed_batch=1)


def photo(spec, name: str):
    return prepare_input(decode_image((IMAGES / name).read_bytes(), spec.limits), spec.input)


def detect(run, spec, name: str):
    tensor, transform = photo(spec, name)
    raw = run(tensor[None])[0]
    return postprocess_image(raw, spec.output.format, transform, num_classes=len(spec.classes),
                             score_threshold=spec.thresholds.score, iou_threshold=spec.thresholds.iou,
                             max_detections=spec.thresholds.max_detections)


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_same_raw_detections(actual: np.ndarray, expected: np.ndarray, *, score_atol: float, box_atol: float,
                               min_score: float = 0.1) -> None:
    """Every expected row [x1 y1 x2 y2 score class] above min_score has a row of the same class, score
    and box in actual (TopK may order near-ties differently, so rows are matched, not compared by index)."""
    rows = expected[expected[:, 4] > min_score]
    assert len(rows), "the reference has no detections to compare"
    for row in rows:
        same = actual[(actual[:, 5] == row[5]) & (np.abs(actual[:, 4] - row[4]) <= score_atol)]
        close = same[np.all(np.abs(same[:, :4] - row[:4]) <= box_atol, axis=1)]
        assert len(close), f"no match for {row} among {same}"


# --- IR variants against the ONNX model ---------------------------------------------------------


def test_fp32_ir_matches_onnx(built, spec, onnx_fp32):
    """Same detections as ONNX Runtime: scores within 1e-3; boxes within a pixel (the two runtimes'
    FP32 kernels sum in different orders; the wh head differs by 0.03 px on average, 0.3 px at p99)."""
    variant = built["fp32"]
    assert (variant.name, variant.runtime, variant.precision, variant.targets) == ("ov-fp32", "openvino", "fp32", ("intel",))
    assert variant.path.name == "model.xml" and all(f.is_file() for f in variant.files())
    runner = OpenVinoDetector(str(variant.path), INPUT, OUTPUT, threads=1)
    for name in ("dog.jpg", "horses.jpg"):
        x = photo(spec, name)[0][None]
        assert_same_raw_detections(runner.run(x)[0], onnx_fp32.run(x)[0], score_atol=1e-3, box_atol=1.0)
    noise = np.random.default_rng(0).integers(0, 256, (1, 512, 512, 3)).astype(np.float32)
    assert_same_raw_detections(runner.run(noise)[0], onnx_fp32.run(noise)[0], score_atol=1e-3, box_atol=1.0)


def test_fp16_ir_is_smaller_and_close(built, spec, onnx_fp32):
    fp32, fp16 = built["fp32"], built["fp16"]
    assert fp16.name == "ov-fp16" and fp16.options["compress_to_fp16"] is True
    bin32, bin16 = fp32.path.with_suffix(".bin").stat().st_size, fp16.path.with_suffix(".bin").stat().st_size
    assert bin16 < 0.6 * bin32
    runner = OpenVinoDetector(str(fp16.path), INPUT, OUTPUT, threads=1)
    x = photo(spec, "dog.jpg")[0][None]
    assert_same_raw_detections(runner.run(x)[0], onnx_fp32.run(x)[0], score_atol=0.01, box_atol=1.5, min_score=0.3)


def test_default_inference_precision_is_f32():
    """bf16 (the CPU plugin's default where the CPU has it) would round box coordinates to whole pixels."""
    assert compile_config("CPU", 1)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config("CPU", 1)["INFERENCE_NUM_THREADS"] == 1
    assert compile_config("AUTO", 2)["DEVICE_PROPERTIES"]["CPU"]["INFERENCE_NUM_THREADS"] == 2
    with pytest.raises(ValueError):
        compile_config("CPU", 1, inference_precision="int4")


def test_fold_transposes_is_bit_exact_and_removes_transposed_data(tmp_path):
    import openvino as ov

    plain = _convert(MODEL)
    folded = _convert(MODEL)
    rewrites = fold_transposes(folded)
    assert rewrites > 0

    def transposed(model) -> int:
        return sum(int(np.prod(op.get_output_shape(0))) for op in model.get_ops() if op.get_type_name() == "Transpose")

    assert transposed(folded) < transposed(plain)
    x = np.random.default_rng(3).integers(0, 256, (1, 512, 512, 3)).astype(np.float32)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
    a = core.compile_model(plain, "CPU", config)({INPUT: x})
    b = core.compile_model(folded, "CPU", config)({INPUT: x})
    for port in ("tower_0/detections", "tower_0/keypoints", "tower_0/wh"):
        np.testing.assert_array_equal(a[port], b[port])


def test_postprocess_nodes_are_the_head_decoding():
    model = _convert(MODEL)
    fold_transposes(model)
    names = postprocess_node_names(model)
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ops()}
    found = {types[n] for n in names}
    assert {"Sigmoid", "MaxPool", "TopK", "Equal", "Gather", "Concat"} <= found
    assert not found & {"Convolution", "GroupConvolution", "Constant", "Parameter", "Result"}
    with pytest.raises(BuilderError, match="no output"):
        postprocess_node_names(model, ["no/such/output"])


# --- INT8 ---------------------------------------------------------------------------------------


def test_int8_records_how_it_was_made(built):
    variant, calibration = built["int8"], built["calibration"]
    assert (variant.name, variant.runtime, variant.precision, variant.targets) == ("ov-int8", "openvino", "int8", ("intel",))
    options = variant.options
    assert options["calibration_sha256"] == calibration.sha256 and options["calibration_count"] == 5
    assert options["calibration_files"] == [p.name for p in calibration.paths]
    assert options["preset"] == "mixed" and options["subset_size"] == 5
    assert options["compute_only"] is True and options["float_depthwise"] is True
    assert "tower_0/TopKV2" in options["ignored_names"]
    assert {"Multiply", "Add", "Concat", "GroupConvolution"} <= set(options["ignored_types"])
    assert options["fake_quantize_ops"] > 30
    assert options["overflow_fix"] == settings_for(host_class()).openvino_overflow_fix
    assert built["int8-portable"].options["overflow_fix"] == "enable"
    assert options["build_seconds"] > 0 and options["openvino"] and options["nncf"]
    json.dumps(options)  # recordable in variant.json
    assert variant.path.with_suffix(".bin").stat().st_size < 0.4 * built["fp32"].path.with_suffix(".bin").stat().st_size
    # the IR really runs int8 convolutions
    runner = OpenVinoDetector(str(variant.path), INPUT, OUTPUT, threads=1)
    runtime = runner.compiled.get_runtime_model()
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ops()
                  if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    assert {"i8", "u8"} & precisions, precisions


@pytest.mark.parametrize("variant", ["int8", "int8-portable"])
def test_int8_keeps_the_fixture_objects(built, spec, onnx_fp32, variant):
    """INT8 (5 calibration photos, none of these) finds FP32's objects (FP32 on this machine) with FP32's boxes;
    scores move a little (~0.04 on average on this model, more for single objects)."""
    runner = OpenVinoDetector(str(built[variant].path), INPUT, OUTPUT, threads=1)
    for name in ("dog.jpg", "horses.jpg", "astronaut.png"):
        boxes, scores, classes = detect(runner.run, spec, name)
        ref_boxes, ref_scores, ref_classes = detect(onnx_fp32.run, spec, name)
        assert len(ref_classes) > 0, name
        assert set(classes.tolist()) == set(ref_classes.tolist()), name
        for box, score, cls in zip(boxes, scores, classes):
            match = [i for i in range(len(ref_classes)) if ref_classes[i] == cls and iou(ref_boxes[i], box) > 0.8]
            assert match, f"{name}: int8 {spec.classes[cls]} {box} matches no FP32 box"
            assert abs(ref_scores[match[0]] - score) < 0.15


def test_int8_with_int8_depthwise_is_smaller_and_keeps_confident_objects(tmp_path, spec, built, onnx_fp32):
    """float_depthwise=False (the faster recipe) quantizes the depthwise convolutions too: its scores move
    by ~0.08 on average (up to ~0.2), so objects near the 0.35 threshold may drop (dog.jpg's bicycle and
    dog, FP32 0.49 and 0.43, do); the confident ones stay, with FP32's boxes, and nothing is invented."""
    variant = build_openvino_int8(MODEL, tmp_path / "dw", built["calibration"], float_depthwise=False, name="ov-int8-dw")
    assert "GroupConvolution" not in variant.options["ignored_types"] and variant.options["float_depthwise"] is False
    assert variant.options["fake_quantize_ops"] > built["int8"].options["fake_quantize_ops"]
    runner = OpenVinoDetector(str(variant.path), INPUT, OUTPUT, threads=1)
    for name in ("dog.jpg", "horses.jpg", "astronaut.png"):
        boxes, scores, classes = detect(runner.run, spec, name)
        ref_boxes, ref_scores, ref_classes = detect(onnx_fp32.run, spec, name)
        confident = {spec.classes[c] for c, s in zip(ref_classes, ref_scores) if s >= 0.5}
        assert confident <= {spec.classes[c] for c in classes} <= {spec.classes[c] for c in ref_classes}, name
        for box, score, cls in zip(boxes, scores, classes):
            match = [i for i in range(len(ref_classes)) if ref_classes[i] == cls and iou(ref_boxes[i], box) > 0.8]
            assert match, f"{name}: int8 {spec.classes[cls]} {box} matches no FP32 box"
            assert abs(ref_scores[match[0]] - score) < 0.25


def test_int8_settings_are_checked_before_any_work(tmp_path, built):
    calibration = built["calibration"]
    with pytest.raises(BuilderError, match="preset"):
        build_openvino_int8(MODEL, tmp_path / "a", calibration, preset="fast")
    with pytest.raises(BuilderError, match="not in the converted model"):
        build_openvino_int8(MODEL, tmp_path / "b", calibration, ignored_names=("no/such/node",))
    with pytest.raises(BuilderError, match="matches no node"):
        build_openvino_int8(MODEL, tmp_path / "c", calibration, ignored_patterns=("^nothing_like_this$",))
    with pytest.raises(BuilderError, match="activation_range"):
        build_openvino_int8(MODEL, tmp_path / "d", calibration, activation_range="guess")
    with pytest.raises(BuilderError, match="overflow_fix"):
        build_openvino_int8(MODEL, tmp_path / "f", calibration, overflow_fix="sometimes")
    with pytest.raises(BuilderError, match="precision"):
        build_openvino(MODEL, tmp_path / "e", "int8")
    with pytest.raises(BuilderError, match="does not exist"):
        build_openvino(tmp_path / "missing.onnx", tmp_path / "f")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_build_replaces_an_older_variant_and_leaves_no_staging(tmp_path):
    out = tmp_path / "ov"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    variant = build_openvino(MODEL, out, "fp32", outputs=[OUTPUT])
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov"]
    assert variant.options["outputs"] == [OUTPUT]
    import openvino as ov

    assert [sorted(o.get_names()) for o in ov.Core().read_model(str(variant.path)).outputs] == [[OUTPUT]]


# --- the runner ---------------------------------------------------------------------------------


def test_runner_uint8_input_equals_float_path(built, spec):
    """The PrePostProcessor path on uint8 pixels gives exactly the float path's output (scale 1, no mean)."""
    floats = OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1)
    uint8 = OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1, uint8_input=True, input_spec=spec.input)
    assert uint8.input_port.get_element_type().to_dtype() == np.uint8
    image = decode_image((IMAGES / "dog.jpg").read_bytes(), spec.limits)
    as_float, _ = prepare_input(image, spec.input)
    as_uint8, _ = prepare_input(image, transport_spec(spec.input))
    np.testing.assert_array_equal(uint8.run(as_uint8[None]), floats.run(as_float[None]))


def _plus_one_model(path: Path, shape: list[int]) -> None:
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("scale,mean,std", [(1 / 255, (0, 0, 0), (1, 1, 1)),
                                            (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_runner_uint8_input_applies_scale_mean_std(tmp_path, layout, scale, mean, std):
    shape = [1, 8, 6, 3] if layout == "NHWC" else [1, 3, 8, 6]
    _plus_one_model(tmp_path / "m.onnx", shape)
    variant = build_openvino(tmp_path / "m.onnx", tmp_path / "ir")
    input_spec = InputSpec(height=8, width=6, layout=layout, scale=scale, mean=mean, std=std)
    image = np.random.default_rng(0).integers(0, 256, (20, 15, 3), dtype=np.uint8)
    as_float, _ = prepare_input(image, input_spec)
    as_uint8, _ = prepare_input(image, transport_spec(input_spec))
    floats = OpenVinoDetector(str(variant.path), "x", "y", threads=1)
    uint8 = OpenVinoDetector(str(variant.path), "x", "y", threads=1, uint8_input=True, input_spec=input_spec)
    dict_spec = OpenVinoDetector(str(variant.path), "x", "y", threads=1, uint8_input=True,
                                 input_spec={"layout": layout, "scale": scale, "mean": list(mean), "std": list(std)})
    expected = floats.run(as_float[None])
    np.testing.assert_allclose(uint8.run(as_uint8[None]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dict_spec.run(as_uint8[None]), expected, rtol=1e-5, atol=1e-5)


def test_runner_batches_and_rejects_bad_tensors(built):
    runner = OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1)
    assert runner.fixed_batch == 1 and runner.item_shape == (512, 512, 3)
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 512, 512, 3)).astype(np.float32)
    out = runner.run(batch)
    assert out.shape == (3, 100, 6)
    np.testing.assert_array_equal(out[1:2], runner.run(batch[1:2]))
    with pytest.raises(InvalidTensorError, match="shape"):
        runner.run(np.zeros((1, 256, 256, 3), np.float32))
    with pytest.raises(InvalidTensorError, match="shape"):
        runner.run(np.zeros((1, 3, 512, 512), np.float32))
    uint8 = OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1, uint8_input=True)
    with pytest.raises(InvalidTensorError, match="uint8"):
        uint8.run(batch[:1])
    with pytest.raises(InvalidTensorError, match="no input"):
        add_uint8_input(_convert(MODEL), "images", None)


def test_runner_on_auto_device(built):
    runner = OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1, device="AUTO")
    assert runner.run(np.zeros((1, 512, 512, 3), np.float32)).shape == (1, 100, 6)
    with pytest.raises(ValueError, match="device"):
        OpenVinoDetector(str(built["fp32"].path), INPUT, OUTPUT, threads=1, device="GPU.7")


# --- the intel target and serving a variant ------------------------------------------------------


def test_intel_target_profile():
    target = make_target("intel")
    assert isinstance(target, IntelTarget)
    assert (target.detector_engine, target.instance_kind, target.device) == ("python_openvino", "KIND_CPU", "CPU")
    assert (target.detector_instances, target.intra_op_threads, target.fuse_input_conversion) == (2, 1, True)
    assert target.python_detector and not target.on_gpu
    assert make_target("intel", device="AUTO").device == "AUTO"
    for overrides in ({"device": "GPU"}, {"instance_kind": "KIND_GPU"}, {"detector_engine": "python_onnxruntime"}):
        with pytest.raises(TargetError, match="intel"):
            make_target("intel", **overrides)
    with pytest.raises(TargetError, match="device"):
        make_target("cpu", device="CPU")


@pytest.fixture(scope="module")
def intel_repo(built, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("intel") / "repo"
    intel_spec = spec.replace(target="intel")
    render_repository(intel_spec, out, target_for(intel_spec), variant=built["int8"])
    return intel_spec, out


def test_intel_repository_serves_the_variant_files(intel_repo, built):
    intel_spec, out = intel_repo
    version = out / f"{intel_spec.name}_detector" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["backends", "model.bin", "model.py", "model.xml"]
    assert (version / "backends" / "detector" / "openvino_runner.py").is_file()
    variant = built["int8"]
    assert sha256(version / "model.xml") == sha256(variant.path)
    assert sha256(version / "model.bin") == sha256(variant.path.with_suffix(".bin"))
    pipeline = json.loads((out / f"{intel_spec.name}.pipeline.json").read_text())
    assert pipeline["target"]["name"] == "intel"
    assert pipeline["model_sha256"] == sha256(MODEL)
    assert pipeline["variant"]["name"] == "ov-int8" and pipeline["variant"]["runtime"] == "openvino"
    assert pipeline["variant"]["files_sha256"] == {"model.xml": sha256(variant.path),
                                                   "model.bin": sha256(variant.path.with_suffix(".bin"))}
    assert sorted(p.name for p in out.parent.iterdir()) == ["repo"]


def test_intel_configs_round_trip_and_use_uint8_transport(intel_repo):
    intel_spec, out = intel_repo
    configs = steps.pipeline_configs(intel_spec, target_for(intel_spec), inspect_onnx(MODEL))
    for step in ("preprocess", "detector", "postprocess", "router", "ensemble"):
        config = getattr(configs, step)
        text = (out / config.name / CONFIG_FILENAME).read_text()
        text_format.Parse(text, model_config_pb2.ModelConfig())
        assert parse(text) == config, step
    detector = configs.detector
    assert detector.backend == "python" and detector.dynamic_batching is None
    assert [(g.kind, g.count) for g in detector.instance_groups] == [("KIND_CPU", 2)]
    assert [t.data_type for t in detector.inputs] == ["TYPE_UINT8"]
    assert [t.data_type for t in configs.preprocess.outputs][0] == "TYPE_UINT8"
    settings = DetectorSettings.from_json(detector.parameters[steps.CONFIG_PARAMETER])
    assert settings.runtime == "openvino" and settings.model_file == "model.xml"
    assert settings.device == "CPU" and settings.uint8_input is True and settings.intra_op_threads == 1
    assert settings.inference_precision == "f32"
    assert settings.input_spec.layout == "NHWC" and settings.input_spec.scale == 1.0
    preprocess = PreprocessSettings.from_json(configs.preprocess.parameters[steps.CONFIG_PARAMETER])
    assert preprocess.input.dtype == "uint8"


def test_served_detector_settings_build_a_working_runner(intel_repo, spec):
    """What detector/model.py does with the rendered settings, outside Triton."""
    intel_spec, out = intel_repo
    config = parse((out / f"{intel_spec.name}_detector" / CONFIG_FILENAME).read_text())
    settings = DetectorSettings.from_json(config.parameters[steps.CONFIG_PARAMETER])
    version = out / f"{intel_spec.name}_detector" / "1"
    runner = make_detector(settings, str(version / settings.model_file))
    assert isinstance(runner, OpenVinoDetector) and runner.uint8_input and runner.output_names == [spec.output.name]
    pixels, _ = prepare_input(decode_image((IMAGES / "horses.jpg").read_bytes(), spec.limits), transport_spec(spec.input))
    [detections] = runner.run_outputs(pixels[None])
    assert detections.shape == (1, 100, 6)


def test_variant_target_mismatch_raises_and_writes_nothing(built, spec, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(TargetError, match="ov-int8.*intel.*not cpu"):
        render_repository(spec, out, variant=built["int8"])  # the spec's target is cpu
    ort_like = Variant("fp32", "onnxruntime", "fp32", MODEL, {}, ("cpu",))
    with pytest.raises(TargetError, match="built for target"):
        render_repository(spec.replace(target="intel"), out, variant=ort_like)
    plan = Variant("trt-fp16", "tensorrt", "fp16", MODEL, {}, ("nvidia-gpu", "jetson"))
    with pytest.raises(TargetError, match="not intel"):
        render_repository(spec.replace(target="intel"), out, variant=plan)
    confused = Variant("odd", "openvino", "fp32", built["fp32"].path, {}, ("cpu",))
    with pytest.raises(TargetError, match="onnxruntime"):
        render_repository(spec, out, variant=confused)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_onnx_variant_on_cpu_gets_input_fusion(spec, tmp_path):
    import onnxruntime as ort

    variant = Variant("fp32", "onnxruntime", "fp32", MODEL, {}, ("cpu",))
    out = render_repository(spec, tmp_path / "repo", variant=variant)
    fused = out / f"{spec.name}_detector" / "1" / "model.onnx"
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert json.loads((out / f"{spec.name}.pipeline.json").read_text())["variant"]["name"] == "fp32"


def test_tensorrt_variant_switches_gpu_target_to_plan(spec, tmp_path):
    plan = tmp_path / "plan" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not really a plan; rendering only copies it")
    variant = Variant("trt-fp16", "tensorrt", "fp16", plan, {}, ("nvidia-gpu", "jetson"))
    gpu_spec = spec.replace(target="nvidia-gpu")
    out = render_repository(gpu_spec, tmp_path / "repo", variant=variant)
    version = out / f"{spec.name}_detector" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.plan"]
    detector = parse((out / f"{spec.name}_detector" / CONFIG_FILENAME).read_text())
    assert detector.platform == "tensorrt_plan" and detector.default_model_filename == "model.plan"


def test_intel_without_variant_converts_the_spec_model(spec, tmp_path):
    out = render_repository(spec.replace(target="intel"), tmp_path / "repo")
    version = out / f"{spec.name}_detector" / "1"
    assert (version / "model.xml").is_file() and (version / "model.bin").is_file()
    assert json.loads((out / f"{spec.name}.pipeline.json").read_text())["variant"]["name"] == "ov-fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_cli_build_with_variant_picks_the_intel_target(built, tmp_path, capsys):
    from edgestack.cli import main

    fp32 = VariantCache.copy(built["fp32"], tmp_path / "ov-fp32")  # the shared folder stays as built
    folder = fp32.path.parent
    save_variant(fp32, {"note": "test"})
    assert load_variant(folder)[0].name == "ov-fp32"
    out = tmp_path / "repo"
    assert main(["build", str(SPEC), "--out", str(out), "--variant", str(folder)]) == 0
    assert "model repository written" in capsys.readouterr().out
    pipeline = json.loads((out / "detect.pipeline.json").read_text())
    assert pipeline["target"]["name"] == "intel" and pipeline["variant"]["name"] == "ov-fp32"
    assert main(["build", str(SPEC), "--out", str(tmp_path / "bad"), "--variant", str(folder), "--target", "cpu"]) == 2
    assert "not cpu" in capsys.readouterr().err
