"""backends.common.settings (the typed step settings) and builder.settings (derived from a spec): what the builder
writes is what every reader gets back, and a missing or invalid field is refused with its name."""
from __future__ import annotations

import json

import pytest

from backends.common.settings import (
    DecodeLimits,
    DetectorSettings,
    InputSpec,
    PipelineSettings,
    PostprocessSettings,
    PreprocessSettings,
    RouterSettings,
    Thresholds,
)
from backends.errors import EdgestackError, SettingsError
from builder import settings as builder_settings
from builder import steps
from builder.model_inspect import inspect_onnx
from builder.repository import target_for
from builder.spec import load_spec
from builder.targets import make_target
from tests.conftest import SPEC

INPUT = InputSpec(height=32, width=48, layout="NCHW", scale=1 / 255, mean=(0.5, 0.5, 0.5))
EXAMPLES = [
    PreprocessSettings(INPUT, DecodeLimits(max_side=4096)),
    DetectorSettings("model.onnx", "images", ("boxes", "scores"), intra_op_threads=2, fixed_batch=None),
    DetectorSettings("model.xml", "images", ("out",), 1, 1, runtime="openvino", device="AUTO", uint8_input=True,
                     input_spec=INPUT),
    PostprocessSettings("boxes_scores", ("cat", "dog"), Thresholds(score=0.3, iou=0.4, max_detections=7)),
    RouterSettings(cloud_url="cloud:8001", min_confidence=0.6),
    PipelineSettings("images", ("boxes", "scores"), PreprocessSettings(INPUT),
                     PostprocessSettings("boxes_scores", ("cat", "dog"))),
]


@pytest.mark.parametrize("settings", EXAMPLES, ids=lambda s: type(s).__name__)
def test_json_round_trip(settings):
    text = settings.to_json()
    assert json.loads(text) == settings.to_dict()
    assert type(settings).from_json(text) == settings


def test_model_config_parameter_is_read_from_json_text_or_parsed():
    settings = EXAMPLES[3]
    config = {"name": "p", "parameters": {"config": {"string_value": settings.to_json()}}}
    assert PostprocessSettings.from_model_config(json.dumps(config), "p") == settings
    assert PostprocessSettings.from_model_config(config, "p") == settings
    with pytest.raises(SettingsError, match="model p has no 'config' parameter; re-render the repository"):
        PostprocessSettings.from_model_config({"name": "p"}, "p")


@pytest.mark.parametrize("cls, data, message", [
    (PostprocessSettings, {"format": "yolov8", "classes": ["a"], "thresholds": {"score": 1.5}},
     "PostprocessSettings.thresholds: thresholds.score must be in [0, 1), got 1.5"),
    (PostprocessSettings, {"format": "ssd", "classes": ["a"]}, "postprocess format 'ssd' is not one of"),
    (PostprocessSettings, {"format": "yolov8", "classes": []}, "classes must be a non-empty list of names"),
    (PostprocessSettings, {"format": "yolov8"}, "PostprocessSettings: missing field(s) ['classes']"),
    (PreprocessSettings, {"input": {"height": 0, "width": 4}}, "PreprocessSettings.input: InputSpec.height must be"),
    (PreprocessSettings, {"input": {"height": 4, "width": 4}, "limit": {}}, "unknown field(s) ['limit']"),
    (PreprocessSettings, [1, 2], "PreprocessSettings: expected a JSON object, got list"),
    (DetectorSettings, {"model_file": "m", "input_name": "i", "output_names": [], "intra_op_threads": 1},
     "detector output_names must be non-empty names"),
    (DetectorSettings, {"model_file": "m", "input_name": "i", "output_names": ["a", "a"], "intra_op_threads": 1},
     "must not repeat a name"),
    (DetectorSettings, {"model_file": "m", "input_name": "i", "output_names": ["a"], "intra_op_threads": 1,
                        "runtime": "tvm"}, "detector runtime 'tvm' is not one of"),
    (DetectorSettings, {"model_file": "m", "input_name": "i", "output_names": ["a"], "intra_op_threads": "2"},
     "intra_op_threads must be an integer >= 0"),
    (RouterSettings, {"deadline_ms": 0}, "router.deadline_ms must be a positive integer"),
    (RouterSettings, {"cloud_url": "no-port"}, "router.cloud_url must be host:port"),
    (PipelineSettings, {"input_name": "i", "output_names": ["a"], "preprocess": {"input": {"height": 4, "width": 4}},
                        "postprocess": {"format": "boxes_scores", "classes": ["a"]}},
     "format 'boxes_scores' reads 2 output(s) (boxes, scores), got ['a']"),
])
def test_invalid_settings_are_refused_naming_the_field(cls, data, message):
    with pytest.raises(SettingsError) as raised:
        cls.from_json(json.dumps(data))
    assert message in str(raised.value)
    assert isinstance(raised.value, EdgestackError) and isinstance(raised.value, ValueError)


def test_not_json_is_refused():
    with pytest.raises(SettingsError, match="settings of m: not JSON"):
        RouterSettings.from_json("{", "settings of m")


def test_detector_settings_of_an_older_repository_have_one_output_name():
    """A version folder rendered now may be installed beside a config.pbtxt rendered before several outputs."""
    older = {"model_file": "model.onnx", "input_name": "x", "output_name": "y", "intra_op_threads": 1, "fixed_batch": 1}
    settings = DetectorSettings.from_json(json.dumps(older))
    assert settings.output_names == ("y",) and settings.runtime == "onnxruntime" and settings.fixed_batch == 1


def test_postprocess_options_are_postprocess_image_keywords():
    settings = PostprocessSettings("yolov8", ("a", "b", "c"), Thresholds(0.4, 0.6, 9, True))
    assert settings.roles == ("predictions",)
    assert settings.options() == dict(num_classes=3, score_threshold=0.4, iou_threshold=0.6, max_detections=9,
                                      class_agnostic=True, options=None)
    assert settings.options(0.05)["score_threshold"] == 0.05


# --- builder.settings: what the builder writes, from the spec --------------------------------------------

@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.mark.parametrize("target_name", ["cpu", "nvidia-gpu"])
def test_the_rendered_configs_carry_the_settings_derived_from_the_spec(spec, target_name):
    target = target_for(spec.replace(target=target_name))
    interface = inspect_onnx(spec.model_path)
    configs = steps.pipeline_configs(spec, target, interface)

    def written(config, cls):
        return cls.from_json(config.parameters[steps.CONFIG_PARAMETER])

    assert written(configs.preprocess, PreprocessSettings) == builder_settings.preprocess_settings(spec, target)
    assert written(configs.postprocess, PostprocessSettings) == builder_settings.postprocess_settings(spec)
    assert written(configs.router, RouterSettings) == spec.router
    if target.python_detector:
        assert written(configs.detector, DetectorSettings) == builder_settings.detector_settings(
            spec, target, interface.fixed_batch)
    else:
        assert steps.CONFIG_PARAMETER not in configs.detector.parameters


def test_preprocess_emits_uint8_only_where_the_detector_converts(spec):
    cpu = make_target("cpu")
    assert builder_settings.fuses_input(spec, cpu)
    assert builder_settings.preprocess_settings(spec, cpu).input.dtype == "uint8"
    assert builder_settings.preprocess_settings(spec).input == spec.input  # the source model's own input
    gpu = make_target("nvidia-gpu")
    assert builder_settings.preprocess_settings(spec, gpu).input == spec.input


def test_pipeline_settings_are_the_source_models(spec):
    settings = builder_settings.pipeline_settings(spec)
    assert settings.input_name == spec.input_name and settings.output_names == (spec.output.name,)
    assert settings.preprocess == PreprocessSettings(spec.input, spec.limits)
    assert settings.postprocess == PostprocessSettings(spec.output.format, spec.classes, spec.thresholds, spec.decode_options)
