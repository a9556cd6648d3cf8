"""Pipelines of several models (ensembles/): the spec's pipeline section, the rendered wiring of the cascade and the
parallel ensemble, the fixture detector rewritten to a smaller input, the cascade's decision and the box fusion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from backends.cascade.stages import run_cascade
from backends.common import tensors as T
from backends.common.detections import Detections
from backends.common.pipeline_settings import CascadeSettings, FusionSettings
from backends.errors import SettingsError
from backends.fusion.wbf import fuse
from builder.errors import BuilderError, SpecError
from builder.pipeline_choice import PIPELINE_KINDS, parse_pipeline
from builder.spec import load_spec
from builder.triton_config_parse import parse
from builder.triton_config_render import CONFIG_FILENAME
from ensembles import PIPELINES, render_pipeline
from ensembles.input_resize import resize_input
from tests.conftest import IMAGES, MODEL, ROOT

CASCADE_SPEC = ROOT / "specs" / "centernet_cascade.yaml"
PARALLEL_SPEC = ROOT / "specs" / "centernet_parallel.yaml"
INPUT = "tower_0/images:0"


def test_every_pipeline_kind_has_a_module():
    assert tuple(PIPELINES) == PIPELINE_KINDS
    for module in PIPELINES.values():
        assert callable(module.render) and module.SUMMARY


def test_pipeline_section_defaults_to_the_single_detector(tmp_path):
    choice = parse_pipeline(None, tmp_path)
    assert choice.kind == "single" and choice.second is None


@pytest.mark.parametrize("raw, field", [
    ({"kind": "cascade"}, "pipeline.second"),
    ({"kind": "fan-out"}, "pipeline.kind"),
    ({"kind": "cascade", "second": {"height": 320}}, "pipeline.second"),
    ({"kind": "cascade", "second": {"height": 8, "width": 8}}, "pipeline.second.height"),
    ({"kind": "cascade", "second": {"path": "missing.onnx"}}, "pipeline.second.path"),
    ({"kind": "cascade", "second": {"size": 3}}, "pipeline.second"),
    ({"kind": "parallel", "second": {"height": 384, "width": 384}, "fusion": {"weights": [1]}}, "pipeline.fusion.weights"),
    ({"kind": "parallel", "second": {"height": 384, "width": 384}, "fusion": {"iou": 0}}, "pipeline.fusion.iou"),
    ({"kind": "cascade", "second": {"height": 320, "width": 320}, "min_confidence": 2}, "pipeline.min_confidence"),
    ({"kinds": "cascade"}, "pipeline"),
])
def test_a_bad_pipeline_section_is_refused_naming_the_field(tmp_path, raw, field):
    with pytest.raises(SpecError) as info:
        parse_pipeline(raw, tmp_path)
    assert str(info.value).startswith(field), str(info.value)


def test_the_shipped_specs_choose_their_pipelines():
    cascade, parallel = load_spec(CASCADE_SPEC), load_spec(PARALLEL_SPEC)
    assert cascade.pipeline.kind == "cascade" and (cascade.pipeline.second.height, cascade.pipeline.second.width) == (320, 320)
    assert parallel.pipeline.kind == "parallel" and parallel.pipeline.fusion.weights == (2.0, 1.0)
    assert cascade.router.cloud_model == cascade.name and parallel.router.cloud_model == parallel.name
    assert json.loads(json.dumps(cascade.to_dict()))["pipeline"]["kind"] == "cascade"


def _configs(repo: Path) -> dict:
    return {p.parent.name: parse(p.read_text()) for p in repo.glob(f"*/{CONFIG_FILENAME}")}


def _assert_wired(configs: dict, name: str) -> dict:
    """Each step's maps name that model's tensors and every tensor keeps one dtype and shape end to end."""
    ensemble = configs[name]
    tensors = {t.name: (t.data_type, tuple(t.dims)) for t in ensemble.inputs}
    for step in ensemble.ensemble_steps:
        model = configs[step.model_name]
        inputs = {t.name: t for t in model.inputs}
        outputs = {t.name: t for t in model.outputs}
        required = {t.name for t in model.inputs if not t.optional}
        assert required <= set(step.input_map) <= set(inputs), step.model_name
        assert set(step.output_map) <= set(outputs), step.model_name
        for model_input, tensor in step.input_map.items():
            assert tensors[tensor] == (inputs[model_input].data_type, tuple(inputs[model_input].dims)), tensor
        for model_output, tensor in step.output_map.items():
            tensors[tensor] = (outputs[model_output].data_type, tuple(outputs[model_output].dims))
    for out in ensemble.outputs:
        assert tensors[out.name] == (out.data_type, tuple(out.dims)), out.name
    return tensors


@pytest.fixture(scope="module")
def pipelines_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipelines") / "model_repository"
    for spec in (CASCADE_SPEC, PARALLEL_SPEC):
        render_pipeline(load_spec(spec), repo)
    return repo


def test_cascade_is_a_bls_step_then_the_router_over_two_member_ensembles(pipelines_repo):
    configs = _configs(pipelines_repo)
    top = configs["cascade"]
    assert [s.model_name for s in top.ensemble_steps] == ["cascade_cascade", "cascade_router"]
    assert [t.name for t in top.outputs] == [*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS, T.STAGE]
    _assert_wired(configs, "cascade")
    settings = CascadeSettings.from_model_config(
        {"parameters": {k: {"string_value": v} for k, v in configs["cascade_cascade"].parameters.items()}}, "cascade")
    assert settings.stages == ("cascade_fast", "cascade_precise") and settings.stage_names == ("fast", "precise")
    for member, size in (("cascade_fast", 320), ("cascade_precise", 512)):
        _assert_wired(configs, member)
        assert [t.name for t in configs[member].outputs] == [*T.EDGE_TO_FINAL, T.STATUS]
        assert list(configs[f"{member}_detector"].inputs[0].dims) == [size, size, 3]
    record = json.loads((pipelines_repo / "cascade.pipeline.json").read_text())
    assert record["kind"] == "cascade" and record["inputs"] == {"fast": [320, 320], "precise": [512, 512]}
    assert record["settings"]["input_name"] == INPUT  # golden sets run the spec's own model (sidecar/golden.py)


def test_parallel_runs_both_branches_into_the_fusion_then_the_router(pipelines_repo):
    configs = _configs(pipelines_repo)
    top = configs["parallel"]
    names = [s.model_name for s in top.ensemble_steps]
    assert names[-2:] == ["parallel_fusion", "parallel_router"]
    assert {n for n in names if n.startswith("parallel_a_")} == {"parallel_a_preprocess", "parallel_a_detector", "parallel_a_postprocess"}
    assert {n for n in names if n.startswith("parallel_b_")} == {"parallel_b_preprocess", "parallel_b_detector", "parallel_b_postprocess"}
    tensors = _assert_wired(configs, "parallel")
    assert {"A_EDGE_BOXES", "B_EDGE_BOXES", T.STATUS} <= set(tensors)
    assert [t.name for t in top.outputs] == [*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS]
    assert list(configs["parallel_b_detector"].inputs[0].dims) == [384, 384, 3]


def _variant(path: Path, name: str, targets=("cpu",)):
    from builder.optimize.variants import Variant

    return Variant(name, "onnxruntime", "fp32", path, {}, targets)


@pytest.mark.parametrize("spec_path, roles", [(CASCADE_SPEC, ("precise", "fast")), (PARALLEL_SPEC, ("a", "b"))])
def test_each_model_of_a_pipeline_may_serve_a_variant_of_its_own(tmp_path, spec_path, roles):
    from backends.common.files import sha256_file

    spec = load_spec(spec_path)
    size = spec.pipeline.second.height
    own, second = tmp_path / "own.onnx", tmp_path / "second.onnx"
    own.write_bytes(MODEL.read_bytes())
    resize_input(MODEL, second, INPUT, "NHWC", size, size)
    repo = render_pipeline(spec, tmp_path / "repo", variant=_variant(own, "own"),
                           second_variant=_variant(second, "second"))
    record = json.loads((repo / f"{spec.name}.pipeline.json").read_text())
    first, other = roles
    assert record["variants"][first]["name"] == "own" and record["variants"][other]["name"] == "second"
    assert record["variants"][other]["files_sha256"]["second.onnx"] == sha256_file(second)
    served = ort.InferenceSession(str(repo / f"{spec.name}_{other}_detector" / "1" / "model.onnx"))
    assert served.get_inputs()[0].shape[1:3] == [size, size]

    only_first = render_pipeline(spec, tmp_path / "repo2", variant=_variant(own, "own"))
    assert set(json.loads((only_first / f"{spec.name}.pipeline.json").read_text())["variants"]) == {first}


def test_a_variant_that_does_not_fit_its_model_or_the_target_is_refused(tmp_path):
    from builder.errors import TargetError

    spec = load_spec(CASCADE_SPEC)
    with pytest.raises(BuilderError, match="320"):  # the spec's 512x512 model offered as the 320x320 fast stage
        render_pipeline(spec, tmp_path / "repo", second_variant=_variant(MODEL, "wrong-size"))
    with pytest.raises(TargetError, match="built for target"):
        render_pipeline(spec, tmp_path / "repo", variant=_variant(MODEL, "ov", targets=("intel",)))
    with pytest.raises(BuilderError, match="one detector"):
        render_pipeline(load_spec(ROOT / "specs" / "centernet_coco.yaml"), tmp_path / "repo",
                        second_variant=_variant(MODEL, "x"))
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def _detections(session: ort.InferenceSession, size: int, image: Path) -> np.ndarray:
    pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)[None]
    det = session.run(["tower_0/detections"], {INPUT: pixels})[0][0]
    det = det[det[:, 4] > 0.35]
    det[:, :4] *= 512.0 / size  # on the 512 model's pixels
    return det


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_fixture_detector_rewritten_to_320_finds_what_it_finds_at_512(tmp_path):
    small = resize_input(MODEL, tmp_path / "small.onnx", INPUT, "NHWC", 320, 320)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    full = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    fast = ort.InferenceSession(str(small), options, providers=["CPUExecutionProvider"])
    assert fast.get_inputs()[0].shape == [1, 320, 320, 3]
    matched = total = 0
    for image in ("horses.jpg", "grace_hopper.jpg", "person.jpg", "eagle.jpg"):
        reference, answer = _detections(full, 512, IMAGES / image), _detections(fast, 320, IMAGES / image)
        for box in reference[reference[:, 4] > 0.5]:
            total += 1
            matched += any(int(b[5]) == int(box[5]) and _iou(b, box) > 0.6 for b in answer)
    assert total >= 4 and matched == total


def test_a_graph_that_cannot_take_another_size_is_refused_at_build(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12288])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 12288])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    source = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(source))
    with pytest.raises(BuilderError, match="cannot be resized to 32x32: a trial run failed"):
        resize_input(source, tmp_path / "out.onnx", "x", "NHWC", 32, 32)


def _det(scores, classes=None, boxes=None) -> Detections:
    n = len(scores)
    boxes = np.array(boxes if boxes is not None else [[10, 10, 50, 50]] * n, dtype=np.float32).reshape(-1, 4)
    return Detections(boxes, np.array(scores, np.float32), np.array(classes or [0] * n, np.int32))


def test_the_cascade_asks_the_next_stage_only_for_unconfident_images():
    answers = {0: [_det([0.9]), _det([0.2]), _det([]), _det([0.6])], 1: [_det([0.4]), _det([])]}
    asked = []

    def ask(stage, indices):
        asked.append((stage, list(indices)))
        return answers[stage], [""] * len(indices)

    detections, stages, statuses = run_cascade(4, ("fast", "precise"), 0.5, ask)
    assert asked == [(0, [0, 1, 2, 3]), (1, [1, 2])]
    assert stages == ["fast", "precise", "precise", "fast"]
    assert [d.best_score for d in detections] == pytest.approx([0.9, 0.4, 0.0, 0.6])
    assert statuses == ["", "", "", ""]


def test_an_image_a_stage_cannot_use_goes_no_further():
    def ask(stage, indices):
        assert stage == 0, "the bad image must not reach the precise stage"
        return [_det([]), _det([0.8])], ["image 0: empty image bytes", ""]

    _, stages, statuses = run_cascade(2, ("fast", "precise"), 0.5, ask)
    assert stages == ["", "fast"] and statuses == ["image 0: empty image bytes", ""]


def test_fusion_averages_agreeing_boxes_and_keeps_a_lone_box_at_a_weighted_score():
    a = _det([0.8, 0.6], [1, 2], [[100, 100, 200, 200], [300, 300, 400, 380]])
    b = _det([0.6], [1], [[104, 100, 204, 200]])
    fused = fuse([a, b], (1.0, 1.0), 480, 640, iou=0.55, skip_score=0.0, max_detections=10)
    assert len(fused) == 2 and fused.class_ids.tolist() == [1, 2]
    assert fused.scores[0] == pytest.approx(0.7, abs=1e-5)  # (0.8 + 0.6) / 2
    assert fused.boxes[0, 0] == pytest.approx((100 * 0.8 + 104 * 0.6) / 1.4, abs=0.05)
    assert fused.scores[1] == pytest.approx(0.3, abs=1e-5)  # only one of two models found it
    assert fused.boxes[1].tolist() == pytest.approx([300, 300, 400, 380], abs=0.05)
    assert len(fuse([_det([]), _det([])], (1.0, 1.0), 480, 640, 0.55, 0.0, 10)) == 0


@pytest.mark.parametrize("cls, data, field", [
    (CascadeSettings, {"stages": ["a"], "stage_names": ["a"], "min_confidence": 0.5}, "cascade stages"),
    (CascadeSettings, {"stages": ["a", "b"], "stage_names": ["a"], "min_confidence": 0.5}, "cascade stage_names"),
    (FusionSettings, {"weights": [1, -1], "iou": 0.5, "skip_score": 0, "max_detections": 5, "classes": ["x"]}, "fusion weights"),
    (FusionSettings, {"weights": [1, 1], "iou": 0.5, "skip_score": 0, "max_detections": 5}, "missing field"),
])
def test_joining_step_settings_refuse_a_bad_field_by_name(cls, data, field):
    with pytest.raises(SettingsError, match=field):
        cls.from_dict(data)

