"""builder.trial_run: `edgestack build` runs the model once at the spec's size and refuses outputs the declared
format does not read, naming the field, what the model gave and what fits (graphs from tests/any_detector_models.py
with symbolic output dimensions: the declared shapes alone cannot tell)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from builder.errors import BuilderError
from builder.repository import render_repository
from builder.spec import load_spec, parse_spec
from builder.trial_run import check_trial_run, fitting_formats, sample_batch
from tests import any_detector_models as models


@pytest.mark.parametrize("fmt", sorted(models.LAYOUTS))
def test_every_layout_passes_its_own_format_and_only_fits_formats_that_read_it(tmp_path, fmt):
    spec = load_spec(models.write_spec(tmp_path, fmt))
    trial = check_trial_run(spec)
    assert list(trial.outputs) == list(spec.output.names)
    assert fmt in fitting_formats(list(trial.outputs.values()), spec)


def test_the_sample_is_the_servers_preprocess_output_at_the_spec_size(tmp_path):
    spec = load_spec(models.write_spec(tmp_path, "tf_od_api"))  # the graph takes uint8 NHWC of any size
    batch = sample_batch(spec, 2)
    assert batch.shape == (2, models.HEIGHT, models.WIDTH, 3) and batch.dtype == np.uint8
    assert 100 < batch.mean() < 155  # noise over the whole range, not a flat picture
    float_spec = load_spec(models.write_spec(tmp_path, "yolov5"))
    sample = sample_batch(float_spec, 1)
    assert sample.shape == (1, 3, models.HEIGHT, models.WIDTH) and sample.dtype == np.float32 and sample.max() <= 1


def test_a_wrong_format_for_a_dynamic_output_names_the_field_the_shapes_and_the_problem(tmp_path):
    spec = load_spec(models.write_spec(tmp_path, "tf_od_api", "wrong", {"format": "detections",
                                                                         "name": "detection_boxes"}))
    with pytest.raises(BuilderError) as refused:
        check_trial_run(spec)
    message = str(refused.value)
    assert message.startswith("model.output.format 'detections' does not fit the model: a trial run on a sample "
                              f"input [1, {models.HEIGHT}, {models.WIDTH}, 3] uint8 gave 'detection_boxes' float32")
    assert "needs an output [B, K, 6]; the model's is [1, 6, 4]" in message
    assert "no registered format reads them with the spec's 3 classes" in message


def test_the_formats_that_fit_are_named(tmp_path):
    spec = load_spec(models.write_spec(tmp_path, "yolov5", "wrong", {"format": "yolov8", "name": "output0"}))
    with pytest.raises(BuilderError, match="formats that read these outputs: yolov5$"):
        check_trial_run(spec)


@pytest.mark.parametrize("fmt, output, field", [
    ("tf_od_api", {"class_offset": 0}, "model.output.class_offset"),
    ("yolox", {"strides": [8, 16]}, "model.output.strides"),
])
def test_a_wrong_option_is_named_with_the_formats_defaults(tmp_path, fmt, output, field):
    layout = models.LAYOUTS[fmt]
    spec = load_spec(models.write_spec(tmp_path, fmt, "wrong", {**layout.output, **output}))
    with pytest.raises(BuilderError, match=f"reads them with its default options .*; check {field}$"):
        check_trial_run(spec)


def test_a_model_that_does_not_run_at_the_spec_size_is_refused_with_the_input(tmp_path):
    path = models.write_spec(tmp_path, "yolov5")
    # The graph is fixed at 48x64 (the build's interface check refuses a 64x64 spec by the declared shape first;
    # a graph whose size is fixed inside, past a dynamic input, only the trial run can refuse).
    spec = load_spec(path)
    spec = spec.replace(input=type(spec.input)(**{**spec.input.__dict__, "height": 64}))
    with pytest.raises(BuilderError, match=r"does not run on a sample input \[1, 3, 64, 64\] float32 at the spec's "
                                           r"model.input size \(NCHW 64x64\)"):
        check_trial_run(spec)


def test_the_build_runs_it_and_writes_nothing_when_refused(tmp_path):
    spec = load_spec(models.write_spec(tmp_path, "rtdetr", "wrong", {"format": "yolov5", "name": "pred_logits"}))
    with pytest.raises(BuilderError, match="model.output.format 'yolov5' does not fit the model"):
        render_repository(spec, tmp_path / "repository")
    assert not (tmp_path / "repository" / "wrong").exists()
    good = load_spec(models.write_spec(tmp_path, "rtdetr"))
    assert (render_repository(good, tmp_path / "repository") / "rtdetr" / "config.pbtxt").is_file()


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "specs" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_example_specs_load_with_their_layouts_conventions(tmp_path, path):
    raw = yaml.safe_load(path.read_text())
    raw["model"]["path"] = str(models.write_model(tmp_path / "stand_in.onnx", models.yolov5_outputs()))
    spec = parse_spec(raw, path.parent)  # the models are not shipped: a stand-in file for the path check
    options = spec.decode_options
    assert len(spec.classes) in (80, 90) and (options.input_height, options.input_width) == (spec.input.height,
                                                                                              spec.input.width)
    if spec.output.format in ("tf_od_api", "torchvision"):
        assert options.class_offset == 1 and len(spec.classes) == 90 and spec.classes[11] == "N/A"
    if spec.output.format in ("tf_od_api", "rtdetr"):
        assert options.normalized
