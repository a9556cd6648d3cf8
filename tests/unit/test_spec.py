"""builder.spec: the shipped spec loads; every invalid spec raises SpecError naming the offending field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builder.errors import BuilderError, SpecError
from builder.spec import PipelineSpec, load_spec, parse_spec, spec_name
from tests.conftest import FIXTURES, MODEL, SPEC

REPO = Path(__file__).resolve().parents[2]
SHIPPED_SPEC = REPO / "specs" / "centernet_coco.yaml"
FIXTURE_MODEL = MODEL
FIXTURE_NAMES = FIXTURES / "models" / "coco80.names"


def base_spec() -> dict:
    """A valid spec mapping with absolute paths, so it can be written anywhere."""
    return {
        "name": "detect",
        "model": {
            "path": str(FIXTURE_MODEL),
            "input": {"name": "tower_0/images:0", "layout": "NHWC", "height": 512, "width": 512,
                      "channel_order": "RGB", "dtype": "float32", "resize": "stretch", "scale": 1.0},
            "output": {"name": "tower_0/detections", "format": "detections"},
        },
        "classes": ["person", "bicycle", "car"],
        "thresholds": {"score": 0.35, "iou": 0.5, "max_detections": 100},
        "limits": {"max_bytes": 33554432, "max_pixels": 40000000, "max_side": 8192, "min_side": 16},
        "router": {"cloud_url": None, "cloud_model": "detect", "min_confidence": 0.5, "deadline_ms": 500,
                   "failure_threshold": 3, "cooldown_s": 30},
        "target": "cpu",
    }


def write_spec(tmp_path: Path, raw, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def spec_error(tmp_path: Path, raw) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, raw))
    return str(info.value)


# --- the shipped spec -------------------------------------------------------------------------


def test_shipped_spec_loads():
    spec = load_spec(SHIPPED_SPEC)
    assert isinstance(spec, PipelineSpec)
    assert spec.name == "detect"
    assert spec.model_path == FIXTURE_MODEL.resolve()
    assert len(spec.classes) == 80
    assert spec.classes[0] == "person"
    assert spec.classes == tuple(line.strip() for line in FIXTURE_NAMES.read_text().splitlines() if line.strip())
    assert (spec.input.height, spec.input.width) == (512, 512)
    assert spec.input.layout == "NHWC"
    assert spec.input_shape == (512, 512, 3)
    assert spec.input_name == "tower_0/images:0"
    assert spec.input.dtype == "float32"
    assert spec.output.name == "tower_0/detections"
    assert spec.output.format == "detections"
    assert spec.target == "cpu"
    assert spec.router.cloud_url is None
    assert spec.thresholds.score == pytest.approx(0.35)
    assert (spec.limits.min_side, spec.limits.max_side) == (16, 8192)


def test_load_spec_accepts_str_path():
    assert load_spec(str(SHIPPED_SPEC)) == load_spec(SHIPPED_SPEC)


def test_valid_temporary_spec_loads(tmp_path):
    spec = load_spec(write_spec(tmp_path, base_spec()))
    assert spec.classes == ("person", "bicycle", "car")
    assert spec.input_shape == (512, 512, 3)


def test_nchw_shape_puts_channels_first(tmp_path):
    raw = base_spec()
    raw["model"]["input"]["layout"] = "NCHW"
    raw["model"]["input"]["height"], raw["model"]["input"]["width"] = 320, 640
    assert load_spec(write_spec(tmp_path, raw)).input_shape == (3, 320, 640)


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "names.txt").write_text("cat\n\n  dog  \n")
    raw = base_spec()
    sub = tmp_path / "specs"
    sub.mkdir()
    raw["classes"] = "../names.txt"
    spec = load_spec(write_spec(sub, raw))
    assert spec.classes == ("cat", "dog")


def test_parse_spec_directly():
    spec = parse_spec(base_spec(), Path("/nonexistent-base"))  # absolute paths ignore base_dir
    assert spec.model_path == FIXTURE_MODEL
    assert spec.target == "cpu"


def test_defaults_when_optional_sections_are_absent(tmp_path):
    raw = base_spec()
    for key in ("thresholds", "limits", "router", "target", "name"):
        del raw[key]
    spec = load_spec(write_spec(tmp_path, raw))
    assert spec.name == "detect"
    assert spec.target == "cpu"
    assert spec.thresholds.score == pytest.approx(0.35)
    assert spec.router.cloud_url is None


def test_spec_error_is_a_builder_error():
    assert issubclass(SpecError, BuilderError)


# --- validation errors --------------------------------------------------------------------------


def test_unknown_top_level_field(tmp_path):
    raw = base_spec()
    raw["thresholdz"] = {"score": 0.3}
    assert "thresholdz" in spec_error(tmp_path, raw)


@pytest.mark.parametrize(
    "section_path, field",
    [
        (("thresholds",), "scroe"),
        (("limits",), "max_size"),
        (("router",), "cloud"),
        (("model", "input"), "colour_order"),
        (("model", "output"), "formats"),
    ],
)
def test_unknown_field_in_a_section(tmp_path, section_path, field):
    raw = base_spec()
    section = raw
    for key in section_path:
        section = section[key]
    section[field] = 1
    message = spec_error(tmp_path, raw)
    assert field in message
    assert section_path[-1] in message


def test_unknown_field_in_model_section(tmp_path):
    raw = base_spec()
    raw["model"]["pth"] = "other.onnx"
    message = spec_error(tmp_path, raw)
    assert "pth" in message and "model" in message


def test_missing_model_path(tmp_path):
    raw = base_spec()
    del raw["model"]["path"]
    assert "model.path" in spec_error(tmp_path, raw)


def test_missing_model_section(tmp_path):
    raw = base_spec()
    del raw["model"]
    assert "model.path" in spec_error(tmp_path, raw)


def test_missing_model_input_section(tmp_path):
    raw = base_spec()
    del raw["model"]["input"]
    assert "model.input" in spec_error(tmp_path, raw)


def test_missing_classes(tmp_path):
    raw = base_spec()
    del raw["classes"]
    assert "classes" in spec_error(tmp_path, raw)


def test_empty_classes_list(tmp_path):
    raw = base_spec()
    raw["classes"] = []
    assert "classes" in spec_error(tmp_path, raw)


def test_classes_of_wrong_type(tmp_path):
    raw = base_spec()
    raw["classes"] = 80
    assert "classes" in spec_error(tmp_path, raw)


def test_classes_file_missing(tmp_path):
    raw = base_spec()
    raw["classes"] = "no_such.names"
    message = spec_error(tmp_path, raw)
    assert "classes file" in message and "no_such.names" in message


def test_model_file_does_not_exist(tmp_path):
    raw = base_spec()
    raw["model"]["path"] = str(tmp_path / "missing.onnx")
    message = spec_error(tmp_path, raw)
    assert "model.path" in message and "missing.onnx" in message


def test_model_path_is_a_directory(tmp_path):
    raw = base_spec()
    raw["model"]["path"] = str(tmp_path)
    assert "model.path" in spec_error(tmp_path, raw)


@pytest.mark.parametrize(
    "field, value",
    [
        ("layout", "NWHC"),
        ("dtype", "int64"),
        ("resize", "crop"),
        ("channel_order", "GRB"),
        ("pad_value", 256),
        ("scale", 0),
        ("height", 0),
        ("width", -512),
        ("std", [1.0, 0.0, 1.0]),
        ("mean", [0.0, 0.0]),
    ],
)
def test_bad_input_values(tmp_path, field, value):
    raw = base_spec()
    raw["model"]["input"][field] = value
    message = spec_error(tmp_path, raw)
    assert "model.input" in message and field in message
    if isinstance(value, str):
        assert repr(value) in message


def test_empty_input_name(tmp_path):
    raw = base_spec()
    raw["model"]["input"]["name"] = ""
    assert "model.input.name" in spec_error(tmp_path, raw)


def test_missing_input_name(tmp_path):
    raw = base_spec()
    del raw["model"]["input"]["name"]
    assert "model.input.name" in spec_error(tmp_path, raw)


def test_null_input_name(tmp_path):
    raw = base_spec()
    raw["model"]["input"]["name"] = None
    assert "model.input.name" in spec_error(tmp_path, raw)


@pytest.mark.parametrize("section", [[1, 2], "tower_0/images:0", 5])
def test_input_section_that_is_not_a_mapping(tmp_path, section):
    raw = base_spec()
    raw["model"]["input"] = section
    assert "model.input" in spec_error(tmp_path, raw)


@pytest.mark.parametrize("section", [[1, 2], "tower_0/detections"])
def test_output_section_that_is_not_a_mapping(tmp_path, section):
    raw = base_spec()
    raw["model"]["output"] = section
    assert "model.output" in spec_error(tmp_path, raw)


def test_bad_output_format(tmp_path):
    raw = base_spec()
    raw["model"]["output"]["format"] = "ssd"
    message = spec_error(tmp_path, raw)
    assert "model.output.format" in message and "'ssd'" in message


def test_bad_target(tmp_path):
    raw = base_spec()
    raw["target"] = "tpu"
    message = spec_error(tmp_path, raw)
    assert "target" in message and "'tpu'" in message


@pytest.mark.parametrize("score", [1.0, -0.1, 1.5])
def test_score_threshold_out_of_range(tmp_path, score):
    raw = base_spec()
    raw["thresholds"]["score"] = score
    assert "thresholds.score" in spec_error(tmp_path, raw)


@pytest.mark.parametrize("score", [0.0, 0.999])
def test_score_threshold_in_range(tmp_path, score):
    raw = base_spec()
    raw["thresholds"]["score"] = score
    assert load_spec(write_spec(tmp_path, raw)).thresholds.score == pytest.approx(score)


def test_score_threshold_of_wrong_type(tmp_path):
    raw = base_spec()
    raw["thresholds"]["score"] = "high"
    assert "thresholds" in spec_error(tmp_path, raw)


def test_iou_out_of_range(tmp_path):
    raw = base_spec()
    raw["thresholds"]["iou"] = 0.0
    assert "thresholds.iou" in spec_error(tmp_path, raw)


def test_min_side_greater_than_max_side(tmp_path):
    raw = base_spec()
    raw["limits"]["min_side"] = 1024
    raw["limits"]["max_side"] = 512
    message = spec_error(tmp_path, raw)
    assert "min_side" in message and "max_side" in message


def test_min_side_equal_to_max_side_is_fine(tmp_path):
    raw = base_spec()
    raw["limits"]["min_side"] = raw["limits"]["max_side"] = 512
    assert load_spec(write_spec(tmp_path, raw)).limits.min_side == 512


@pytest.mark.parametrize("url", ["cloud.example.com", "cloud.example.com:", ":8001", "cloud.example.com:grpc"])
def test_malformed_cloud_url(tmp_path, url):
    raw = base_spec()
    raw["router"]["cloud_url"] = url
    message = spec_error(tmp_path, raw)
    assert "router.cloud_url" in message and repr(url) in message


@pytest.mark.parametrize("url", ["cloud.example.com:8001", "10.0.0.5:8001"])
def test_well_formed_cloud_url(tmp_path, url):
    raw = base_spec()
    raw["router"]["cloud_url"] = url
    assert load_spec(write_spec(tmp_path, raw)).router.cloud_url == url


@pytest.mark.parametrize(
    "field, value",
    [("min_confidence", 1.5), ("deadline_ms", 0), ("failure_threshold", 0), ("cooldown_s", 0)],
)
def test_bad_router_numbers(tmp_path, field, value):
    raw = base_spec()
    raw["router"][field] = value
    assert f"router.{field}" in spec_error(tmp_path, raw)


def test_negative_runtime_value(tmp_path):
    raw = base_spec()
    raw["runtime"] = {"max_batch_size": -1}
    assert "runtime.max_batch_size" in spec_error(tmp_path, raw)


def test_bad_pipeline_name(tmp_path):
    raw = base_spec()
    raw["name"] = "my detector!"
    assert "name" in spec_error(tmp_path, raw)


def test_section_that_is_not_a_mapping(tmp_path):
    raw = base_spec()
    raw["thresholds"] = 0.5
    assert "thresholds" in spec_error(tmp_path, raw)


def test_invalid_yaml_syntax(tmp_path):
    message = spec_error(tmp_path, "name: detect\nmodel: {path: [unclosed\n")
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["just some words", "- a\n- list\n", ""])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    assert "mapping" in spec_error(tmp_path, text)


def test_binary_file_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81binary\x00\xc3")
    with pytest.raises(SpecError):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)


def test_replace_revalidates():
    spec = parse_spec(base_spec(), Path("/"))
    with pytest.raises(SpecError):
        spec.replace(target="tpu")
    assert spec.replace(target="jetson").target == "jetson"



# --- model.output: one tensor per role of the format ----------------------------------------------------


def two_output_spec(output: dict) -> dict:
    raw = base_spec()
    raw["model"]["output"] = output
    return raw


@pytest.mark.parametrize("names", [{"scores": "s", "boxes": "b"}, ["b", "s"]])
def test_output_names_of_a_two_output_format_in_role_order(tmp_path, names):
    spec = load_spec(write_spec(tmp_path, two_output_spec({"format": "boxes_scores", "names": names})))
    assert spec.output.names == ("b", "s") and spec.output.name == ""
    assert spec.to_dict()["output"] == {"name": "", "format": "boxes_scores", "names": ("b", "s"), "box_encoding": None,
                                        "normalized": None, "class_offset": None, "strides": None,
                                        "score_activation": None}


def test_output_name_of_a_one_output_format_fills_names():
    spec = parse_spec(base_spec(), Path("/"))
    assert spec.output.names == ("tower_0/detections",)
    raw = two_output_spec({"format": "detections", "names": {"detections": "tower_0/detections"}})
    assert parse_spec(raw, Path("/")).output.name == "tower_0/detections"


@pytest.mark.parametrize("output, message", [
    ({"format": "boxes_scores", "names": {"boxes": "b"}}, "missing: ['scores']"),
    ({"format": "boxes_scores", "names": {"boxes": "b", "scores": "s", "logits": "l"}}, "unknown: ['logits']"),
    ({"format": "boxes_scores", "names": ["b"]}, "must name 2 tensor(s), one per role of format 'boxes_scores'"),
    ({"format": "boxes_scores", "names": ["b", "b"]}, "must name different tensors"),
    ({"format": "boxes_scores", "name": "b"}, "name them with model.output.names {role: tensor}"),
    ({"format": "detections"}, "model.output.name must name the model's output tensor"),
    ({"format": "detections", "names": ["a", "b"]}, "must name 1 tensor(s)"),
])
def test_bad_output_names(tmp_path, output, message):
    assert message in spec_error(tmp_path, two_output_spec(output))


def test_the_routers_cloud_model_defaults_to_the_spec_name_and_a_given_one_stays(tmp_path):
    raw = yaml.safe_load(SPEC.read_text())
    raw["name"] = "parts"
    raw["router"] = {key: value for key, value in (raw.get("router") or {}).items() if key != "cloud_model"}
    assert parse_spec(raw, SPEC.parent).router.cloud_model == "parts"
    raw["router"]["cloud_model"] = "parts_large"
    assert parse_spec(raw, SPEC.parent).router.cloud_model == "parts_large"


def test_spec_name_reads_only_the_name(tmp_path):
    (tmp_path / "parts.yaml").write_text("name: parts\nmodel: {path: missing.onnx}\nclasses: []\n")
    assert spec_name(tmp_path / "parts.yaml") == "parts"
    (tmp_path / "unnamed.yaml").write_text("model: {path: missing.onnx}\n")
    assert spec_name(tmp_path / "unnamed.yaml") == "detect"
    with pytest.raises(SpecError, match="a spec must be a YAML mapping"):
        (tmp_path / "list.yaml").write_text("- name\n")
        spec_name(tmp_path / "list.yaml")
