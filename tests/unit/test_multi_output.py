"""A detector with two outputs (format boxes_scores, tests/boxes_scores_model.py) through everything but a server:
the rendered configs and ensemble wiring, the build-time checks, the runner, evaluation, golden sets and the health
gate's in-process steps. Served by a real tritonserver: tests/integration/test_multi_output.py."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from backends.common import tensors as T
from backends.common.settings import DetectorSettings, PostprocessSettings
from backends.detector.onnx_runner import OnnxDetector, make_session
from builder.errors import BuilderError
from builder.optimize.evaluate import detect_images
from builder.repository import render_repository
from builder.settings import pipeline_settings
from builder.spec import load_spec, parse_spec
from builder.triton_config import CONFIG_FILENAME
from builder.triton_config_parse import parse
from sidecar.golden import reference_from_repository, reference_from_spec, run_reference
from sidecar.health import PipelineSteps
from sidecar.triton_control import TritonControl
from tests import boxes_scores_model as synthetic

RAW = ("RAW_OUTPUT_BOXES", "RAW_OUTPUT_SCORES")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("boxes_scores")


@pytest.fixture(scope="module")
def spec_path(folder):
    return synthetic.write_spec(folder)


@pytest.fixture(scope="module")
def spec(spec_path):
    return load_spec(spec_path)


@pytest.fixture(scope="module")
def repo(spec, folder):
    return render_repository(spec, folder / "repository")


@pytest.fixture(scope="module")
def images(folder):
    """A white and a black picture, 128 x 64: stretched 0.5x across, 1x down into the 64 x 64 input."""
    paths = []
    for name, value in (("white.png", 255), ("black.png", 0)):
        Image.new("RGB", (128, 64), (value,) * 3).save(folder / name)
        paths.append(folder / name)
    return paths


def config(repo, model):
    return parse((repo / model / CONFIG_FILENAME).read_text())


def assert_expected(boxes, scores, class_ids, white: bool) -> None:
    expected = synthetic.expected_detections(128, 64, white)
    assert [synthetic.CLASSES[c] for c in class_ids] == [name for name, _, _ in expected]
    np.testing.assert_allclose(boxes, [box for _, box, _ in expected], atol=1e-3)
    np.testing.assert_allclose(scores, [score for _, _, score in expected], atol=1e-4)


def test_the_detector_returns_and_the_ensemble_wires_one_tensor_per_role(spec, repo):
    assert spec.output.names == ("det_boxes", "det_scores")
    detector = config(repo, "boxes_detector")
    assert [(t.name, t.dims) for t in detector.outputs] == [("det_boxes", (4, 4)), ("det_scores", (4, 2))]
    settings = DetectorSettings.from_json(detector.parameters[T.CONFIG_PARAMETER])
    assert settings.output_names == ("det_boxes", "det_scores") and settings.fixed_batch is None
    postprocess = config(repo, "boxes_postprocess")
    assert [(t.name, t.dims) for t in postprocess.inputs] == [(RAW[0], (4, 4)), (RAW[1], (4, 2)), (T.TRANSFORM, (6,))]
    assert PostprocessSettings.from_json(postprocess.parameters[T.CONFIG_PARAMETER]).roles == ("boxes", "scores")
    _, det_step, post_step, _ = config(repo, "boxes").ensemble_steps
    assert det_step.output_map == {"det_boxes": RAW[0], "det_scores": RAW[1]}
    assert post_step.input_map == {RAW[0]: RAW[0], RAW[1]: RAW[1], T.TRANSFORM: T.TRANSFORM}


def test_every_named_tensor_is_checked_at_build_time(spec_path, folder):
    raw = synthetic.spec_mapping(folder / "boxes_scores.onnx")
    raw["model"]["output"]["names"]["scores"] = "logits"
    with pytest.raises(BuilderError, match="model has no output 'logits'"):
        render_repository(parse_spec(raw, folder), folder / "refused")
    raw = synthetic.spec_mapping(folder / "boxes_scores.onnx")
    raw["classes"] = ["cat", "dog", "bird"]
    with pytest.raises(BuilderError, match=r"'det_boxes', 'det_scores': format 'boxes_scores' needs scores \[B, N, C\] "
                                           r"with C = 3"):
        render_repository(parse_spec(raw, folder), folder / "refused")
    assert not (folder / "refused").exists()


def test_the_runner_returns_every_output_also_around_a_fixed_batch(spec):
    batch = np.stack([np.ones((64, 64, 3), np.float32), np.zeros((64, 64, 3), np.float32)])
    whole = OnnxDetector(make_session(str(spec.model_path), 1), "images", spec.output.names, None)
    parts = OnnxDetector(make_session(str(spec.model_path), 1), "images", spec.output.names, fixed_batch=1)
    for runner in (whole, parts):
        boxes, scores = runner.run_outputs(batch)
        assert boxes.shape == (2, 4, 4) and scores.shape == (2, 4, 2)
        assert scores[0, 2, 1] == pytest.approx(0.8) and scores[1, 2, 1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="use run_outputs"):
        whole.run(batch)


def test_evaluation_decodes_both_outputs(spec, images):
    runner = OnnxDetector(make_session(str(spec.model_path), 1), "images", spec.output.names, None)
    white, black = detect_images(runner, spec, images, score_threshold=spec.thresholds.score)
    assert_expected(white.boxes, white.scores, white.class_ids, white=True)
    assert_expected(black.boxes, black.scores, black.class_ids, white=False)


def test_golden_sets_run_both_outputs_with_the_recorded_settings(spec, spec_path, repo, images):
    from_repository = reference_from_repository(repo, "boxes_detector")
    assert from_repository.pipeline == reference_from_spec(spec_path).pipeline == pipeline_settings(spec)
    white, black = run_reference(from_repository, images)
    assert_expected(white.boxes, white.scores, white.class_ids, white=True)
    assert_expected(black.boxes, black.scores, black.class_ids, white=False)


class ReversedOutputs(TritonControl):
    """The repository's configs with the detector's outputs listed the other way round."""

    def disk_config(self, model):
        found = super().disk_config(model)
        if model == self.detector_model:
            found["output"] = found["output"][::-1]
        return found


@pytest.mark.parametrize("control_class, order", [(TritonControl, [0, 1]), (ReversedOutputs, [1, 0])])
def test_the_gate_hands_the_outputs_to_postprocess_by_role(repo, images, control_class, order):
    control = control_class("127.0.0.1:1", repo, detector_model="boxes_detector", ensemble_model="boxes")
    steps = PipelineSteps(control)
    assert steps.output_order == order
    served = ort.InferenceSession(str(repo / "boxes_detector" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    config_order = [o["name"] for o in control.disk_config("boxes_detector")["output"]]
    for path, white in zip(images, (True, False)):
        tensor, transform = steps.preprocess(path.read_bytes())
        assert tensor.dtype == np.uint8  # the CPU detector converts the pixels itself
        outputs = served.run(config_order, {"images": tensor})  # what infer_detector returns: config order
        assert_expected(*steps.postprocess(outputs, transform), white=white)


def test_the_openvino_runner_returns_every_output_too(spec, folder):
    import openvino as ov

    from backends.detector.openvino_runner import OpenVinoDetector

    xml = folder / "boxes_scores.xml"
    ov.save_model(ov.convert_model(str(spec.model_path)), str(xml))
    runner = OpenVinoDetector(str(xml), "images", spec.output.names, threads=1)
    boxes, scores = runner.run_outputs(np.stack([np.ones((64, 64, 3), np.float32), np.zeros((64, 64, 3), np.float32)]))
    np.testing.assert_allclose(boxes[1], synthetic.BOXES)
    assert scores[:, 2, 1] == pytest.approx([0.8, 0.2], abs=1e-3)
