"""sidecar.golden (+ bundle golden / bundle create --golden-images) and the gate's report of every mismatch."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builder.settings import pipeline_settings
from builder.spec import load_spec
from edgestack.cli import main
from sidecar import bundle as B
from sidecar.bundle_types import ExpectedOutput
from sidecar.errors import GoldenSetError, HealthGateError
from sidecar.golden import (GoldenCriteria, judge, make_golden_set, read_expected, reference_from_repository,
                            reference_from_spec, sha256_file)
from sidecar.health import StageThresholds, compare_detections, health_gate
from sidecar.trust import TrustStore
from tests.conftest import IMAGES, SPEC

FIXTURES = IMAGES.parent
STRONG = [IMAGES / "dog.jpg", IMAGES / "horses.jpg", IMAGES / "person.jpg"]  # FP32: 7 confident, 5 classes
BIRDS_ONLY = [FIXTURES / "images_more" / "home.jpg", IMAGES / "china.jpg"]  # FP32: 10 confident birds


def out(scores, classes, name="") -> ExpectedOutput:
    return ExpectedOutput("", [[0, 0, 10, 10]] * len(scores), list(scores), list(classes), name)


# --- the criteria ----------------------------------------------------------------------------------------

def test_judge_counts_only_detections_clear_of_the_gates_tolerance():
    strong = [out([0.9, 0.5], [0, 16]), out([0.45, 0.41], [1, 1]), out([], [])]
    counts = judge(strong, 0.35)
    assert counts == {"images": 3, "confident_detections": 4, "images_with_detections": 2, "classes": [0, 1, 16],
                      "confident_at": 0.4}
    borderline = [out([0.39, 0.38], [0, 16]), out([0.36, 0.399], [1, 2])]  # above 0.35, within the tolerance
    with pytest.raises(GoldenSetError) as err:
        judge(borderline, 0.35)
    message = str(err.value)
    assert "0 confident detections, at least 4 needed (--golden-min-detections)" in message
    assert "0 images with a confident detection, at least 2 needed (--golden-min-images)" in message
    assert "0 distinct classes among them, at least 2 needed (--golden-min-classes)" in message
    assert "score >= 0.400" in message


def test_judge_names_only_the_failed_criterion_and_flags_override_it():
    one_class = [out([0.9, 0.8], [16, 16]), out([0.7, 0.6], [16, 16])]
    with pytest.raises(GoldenSetError) as err:
        judge(one_class, 0.35)
    assert "1 distinct classes among them, at least 2 needed (--golden-min-classes)" in str(err.value)
    assert "--golden-min-detections" not in str(err.value) and "--golden-min-images" not in str(err.value)
    assert judge(one_class, 0.35, GoldenCriteria(min_classes=1))["confident_detections"] == 4
    with pytest.raises(GoldenSetError, match="at least 5 needed"):
        judge(one_class, 0.35, GoldenCriteria(min_detections=5, min_classes=1))
    with pytest.raises(GoldenSetError, match="min_images must be an integer"):
        GoldenCriteria(min_images=-1)


# --- the reference FP32 pipeline -------------------------------------------------------------------------

def _synthetic(folder: Path) -> Path:
    """Images on which the FP32 detector finds nothing confident: flat gray, flat black, uniform noise."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.new("RGB", (320, 240), (128, 128, 128)).save(folder / "gray.png")
    Image.new("RGB", (200, 200), (0, 0, 0)).save(folder / "black.png")
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(folder / "noise.png")
    return folder


def test_images_where_fp32_finds_nothing_are_refused(tmp_path):
    reference = reference_from_spec(SPEC)
    with pytest.raises(GoldenSetError) as err:
        make_golden_set(reference, [_synthetic(tmp_path / "flat")])
    assert "0 confident detections" in str(err.value) and "0 images with a confident detection" in str(err.value)


def test_a_set_of_one_class_is_refused(tmp_path):
    reference = reference_from_spec(SPEC)
    with pytest.raises(GoldenSetError, match=r"1 distinct classes among them, at least 2 needed"):
        make_golden_set(reference, BIRDS_ONLY)
    made = make_golden_set(reference, BIRDS_ONLY, GoldenCriteria(min_classes=1))
    assert made["golden"]["counts"]["classes"] == [14]  # bird


def test_golden_set_is_what_the_servers_functions_give_on_the_fp32_model():
    from backends.detector.onnx_runner import OnnxDetector, make_session
    from builder.optimize.evaluate import detect_images

    spec = load_spec(SPEC)
    made = make_golden_set(reference_from_spec(SPEC), STRONG)
    record = made["golden"]
    assert record["reference"]["model_sha256"] == sha256_file(spec.model_path)
    assert record["reference"]["score_threshold"] == spec.thresholds.score
    assert record["images"] == [p.name for p in STRONG] and record["criteria"]["min_classes"] == 2
    assert record["counts"]["confident_detections"] >= 4 and len(record["counts"]["classes"]) >= 2
    runner = OnnxDetector(make_session(str(spec.model_path), 1), spec.input_name, spec.output.name, None)
    evaluated = detect_images(runner, spec, STRONG, score_threshold=spec.thresholds.score)
    for item, path, det in zip(made["expected_outputs"], STRONG, evaluated):
        assert base64.b64decode(item["image_b64"]) == path.read_bytes() and item["name"] == path.name
        assert item["class_ids"] == det.class_ids.tolist()
        np.testing.assert_allclose(item["scores"], det.scores, atol=1e-4)
        np.testing.assert_allclose(item["boxes"], det.boxes, atol=1e-2)


def test_repository_settings_need_the_model_it_was_rendered_from(tmp_path):
    spec = load_spec(SPEC)
    model = tmp_path / "model.onnx"
    shutil.copyfile(spec.model_path, model)
    older = {"spec": {**spec.to_dict(), "model_path": str(model)}, "model_sha256": sha256_file(model)}
    record = {**older, "settings": pipeline_settings(spec).to_dict()}
    repository = tmp_path / "repository"
    repository.mkdir()
    with pytest.raises(GoldenSetError, match=r"no \*\.pipeline\.json for detect_detector .*--golden-spec"):
        reference_from_repository(repository, "detect_detector")
    (repository / "detect.pipeline.json").write_text(json.dumps(older))
    with pytest.raises(GoldenSetError, match=r"has no 'settings' record: rendered by an older edgestack"):
        reference_from_repository(repository, "detect_detector")
    (repository / "detect.pipeline.json").write_text(json.dumps(record))
    reference = reference_from_repository(repository, "detect_detector")
    assert reference.model_path == model and reference.pipeline == pipeline_settings(spec)
    with model.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(GoldenSetError, match="changed since"):
        reference_from_repository(repository, "detect_detector")
    assert reference_from_repository(repository, "detect_detector", check_model=False).score_threshold == 0.35


# --- CLI -------------------------------------------------------------------------------------------------

def run_cli(*argv) -> int:
    """`edgestack ARGV...`: errors are reported by the CLI's main, exit code 2."""
    return main([str(a) for a in argv])


@pytest.fixture
def signing(tmp_path):
    folder = tmp_path / "repository" / "detect_detector" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(os.urandom(2000))
    assert run_cli("keys", "init", "--dir", tmp_path / "keys") == 0
    trust = TrustStore(tmp_path / "device")
    trust.initialize(json.loads((tmp_path / "keys" / "root.json").read_text()))
    create = ["bundle", "create", folder, "--model-name", "detect_detector", "--model-version", "1.2.0",
              "--target", "cpu", "--keys", tmp_path / "keys"]
    return create, trust


def test_bundle_create_golden_images_signs_the_set_and_its_record(tmp_path, signing, capsys):
    create, trust = signing
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "b.bundle", "--golden-spec", SPEC,
                   "--golden-images", *STRONG) == 0
    assert "dog.jpg: 3 detection(s), 3 confident" in capsys.readouterr().out
    verified = B.verify_bundle(tmp_path / "b.bundle", trust, tmp_path / "staged")
    assert [e.name for e in verified.expected_outputs] == [p.name for p in STRONG]
    assert verified.signed["golden"]["images"] == [p.name for p in STRONG]
    assert verified.signed["golden"]["reference"]["model_sha256"] == sha256_file(load_spec(SPEC).model_path)


def test_bundle_create_refuses_weak_sets_made_or_hand_written(tmp_path, signing, capsys):
    create, _ = signing
    flat = _synthetic(tmp_path / "flat")
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "w.bundle", "--golden-spec", SPEC,
                   "--golden-images", flat) == 2
    assert "golden set too weak for the health gate" in capsys.readouterr().err
    assert not (tmp_path / "w.bundle").exists()
    hand_written = tmp_path / "expected.json"  # the user's: images on which FP32 finds nothing confident
    hand_written.write_text(json.dumps([{"image_b64": "", "boxes": [], "scores": [], "class_ids": []}] * 3))
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "h.bundle", "--golden-spec", SPEC,
                   "--expected-outputs", hand_written) == 2
    assert "0 confident detections" in capsys.readouterr().err
    assert run_cli("bundle", "golden", "--images", *BIRDS_ONLY, "--spec", SPEC, "--out", tmp_path / "g.json") == 2
    assert "--golden-min-classes" in capsys.readouterr().err and not (tmp_path / "g.json").exists()


def test_golden_file_round_trip(tmp_path, signing, capsys):
    create, trust = signing
    golden = tmp_path / "golden.json"
    assert run_cli("bundle", "golden", "--images", *BIRDS_ONLY, "--spec", SPEC, "--out", golden,
                   "--golden-min-classes", 1) == 0
    expected, record = read_expected(json.loads(golden.read_text()), str(golden))
    assert len(expected) == 2 and record["criteria"]["min_classes"] == 1
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "b.bundle", "--expected-outputs", golden) == 2
    assert "--golden-min-classes" in capsys.readouterr().err  # bundle create judges it again, by its own flags
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "b.bundle", "--expected-outputs", golden,
                   "--golden-min-classes", 1) == 0
    verified = B.verify_bundle(tmp_path / "b.bundle", trust, tmp_path / "staged")
    assert verified.signed["golden"] == record and len(verified.expected_outputs) == 2


# --- the gate reports every mismatch -----------------------------------------------------------------------

def test_compare_detections_lists_every_difference_of_an_image():
    expected = ExpectedOutput("", [[10, 10, 110, 110], [200, 200, 300, 300], [0, 0, 50, 50]], [0.9, 0.8, 0.7],
                              [16, 0, 2])
    problem = compare_detections(expected, [[10, 10, 110, 110], [400, 400, 500, 500]], [0.6, 0.9], [16, 5],
                                 iou_min=0.9, score_tolerance=0.05, score_threshold=0.35)
    assert "score 0.600 differs from the expected 0.900" in problem
    assert "expected class 0 (score 0.800)" in problem and "expected class 2 (score 0.700)" in problem
    assert "1 unexpected detection(s), e.g. class 5" in problem


class _Steps:
    score_threshold = 0.35

    def preprocess(self, image: bytes):
        return np.frombuffer(image, np.uint8)[None], None

    def postprocess(self, raw, transform):
        return raw


class _Control:
    """The candidate's answer per image byte (an exception = the call failed); no server involved."""

    def __init__(self, answers):
        self.answers = answers

    def infer_detector(self, version, tensor):
        answer = self.answers[int(tensor[0, 0])]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_gate_checks_every_expected_output_and_reports_all_mismatches():
    from sidecar.errors import TritonControlError

    dog = ([[10, 10, 110, 110]], [0.9], [16])
    expected = [ExpectedOutput(base64.b64encode(bytes([i])).decode(), *dog, name) for i, name in
                enumerate(["a.jpg", "b.jpg", "c.jpg", ""])]
    answers = {0: dog, 1: ([[60, 60, 160, 160]], [0.9], [16]), 2: TritonControlError("model crashed"),
               3: ([[10, 10, 110, 110]], [0.5], [16])}
    with pytest.raises(HealthGateError) as err:
        health_gate(_Control(answers), 2, 1, expected, StageThresholds("t", 1.5, 0.1, 2.0, warmup_requests=0),
                    steps=_Steps())
    message = str(err.value)
    assert message.startswith("v2 does not reproduce 3 of 4 expected outputs")
    assert "expected output 0" not in message
    assert "expected output 1 (b.jpg) differs: expected class 16" in message
    assert "expected output 2 (c.jpg): v2 failed: model crashed" in message
    assert "expected output 3 differs: class 16 at" in message and "score 0.500" in message
    assert isinstance(err.value.__cause__, TritonControlError)
