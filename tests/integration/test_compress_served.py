"""Compressed students served by one real tritonserver through the same ensemble, over gRPC and HTTP.

Three pipelines in one repository, each from a variant folder builder.compress.export writes (what
`edgestack build SPEC --variant DIR` serves):
- detect_r0: the teacher converted to PyTorch, exported and stitched back, FP32: the round trip must serve the
  teacher's detections (fidelity mAP@0.5 against the teacher run in-process, at the spec's threshold);
- detect_r30_fp32 / detect_r30_int8: the teacher pruned by 30% of its prunable channels (magnitude importance,
  bias compensation on unlabelled photos), FP32 and INT8 by the builder's device-class recipe. Without fine-tuning
  such a student has lost its detections (its best scores are ~0.02: the distillation trainer's job), so these are
  served with the score threshold at LOW_SCORE and checked for serving faithfully: what the server answers is what
  the same variant file gives in-process with the server's own preprocess/postprocess functions.
The photos are held out: pruning and INT8 calibration use images_more/, the requests the fixture photos.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from backends.common.files import image_files
from builder.compress import export as ex
from builder.compress import prune as pr
from builder.compress import set_torch_threads
from builder.compress import torch_copy as tc
from builder.optimize import evaluate
from builder.optimize.calibration import load_calibration_set
from builder.optimize.evaluate import ImageDetections
from builder.optimize.pipeline import make_runner
from builder.optimize.variants import Variant
from builder.repository import render_repository, target_for
from builder.spec import load_spec
from edgestack.server import TritonServer
from tests.conftest import FIXTURES, IMAGES, SPEC
from tests.integration.conftest import assert_each_pipeline_serves_its_variant, assert_stopped, served_detections

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOW_SCORE = 0.01  # below the pruned student's best scores (~0.02): enough boxes to compare
UNLABELLED = 3  # images_more/ photos for bias compensation and INT8 calibration


def pipeline_name(variant: str) -> str:
    return "detect_" + variant.replace("-", "_")


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def variants(spec, tmp_path_factory) -> dict[str, Variant]:
    set_torch_threads(1)
    tmp = tmp_path_factory.mktemp("compress_served")
    calibration = load_calibration_set(FIXTURES / "images_more", spec.input, spec.limits, UNLABELLED)
    unlabelled = np.concatenate(calibration.tensors)
    copy = tc.to_torch(spec.model_path, tmp / "work", threads=1)
    assert tc.check_equality(copy, unlabelled[:1]).passed
    r0, _ = ex.export_student(copy, tmp / "students" / "r0.onnx", unlabelled[:1])
    pruned = pr.prune(copy, pr.PruneSettings(0.3, "magnitude"), unlabelled)
    r30, _ = ex.export_student(pruned.copy, tmp / "students" / "r30.onnx", unlabelled[:1])
    record = pruned.to_dict()
    return {
        "r0": ex.build_student_variant(r0, tmp / "variants" / "r0", "r0", spec),
        "r30-fp32": ex.build_student_variant(r30, tmp / "variants" / "r30-fp32", "r30-fp32", spec, record=record),
        "r30-int8": ex.build_student_variant(r30, tmp / "variants" / "r30-int8", "r30-int8", spec, record=record,
                                             calibration=calibration),
    }


def served_spec(spec, name: str):
    if name == "r0":
        return spec.replace(name=pipeline_name(name))
    return spec.replace(name=pipeline_name(name), thresholds=dataclasses.replace(spec.thresholds, score=LOW_SCORE))


@pytest.fixture(scope="module")
def server(spec, variants, tmp_path_factory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("compress_server")
    repository = tmp / "model_repository"
    for name, variant in variants.items():
        served = served_spec(spec, name)
        render_repository(served, repository, target_for(served, detector_instances=1), variant=variant)
    with TritonServer(repository, log_path=tmp / "tritonserver.log") as running:
        pid = running.pid
        yield running
    assert_stopped(pid)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return image_files(IMAGES)


@pytest.fixture(scope="module")
def teacher_reference(spec, photos) -> list[ImageDetections]:
    """The teacher in-process at the spec's threshold (also gives each photo's size as the server decodes it)."""
    return in_process(Variant("teacher", "onnxruntime", "fp32", spec.model_path), spec, photos)


@pytest.fixture(scope="module")
def served(server, variants, photos, teacher_reference) -> dict[tuple[str, str], list[ImageDetections]]:
    return served_detections(server, variants, pipeline_name, photos, teacher_reference)


def in_process(variant: Variant, spec, photos: list[Path], score: float = evaluate.MAP_SCORE_THRESHOLD):
    return evaluate.detect_images(make_runner(variant, spec, 1, 1), spec, photos, score_threshold=score)


def test_round_trip_serves_the_teacher(spec, served, teacher_reference):
    for protocol in ("grpc", "http"):
        fidelity = evaluate.fidelity_map(teacher_reference, served["r0", protocol],
                                         reference_score_threshold=spec.thresholds.score)
        print(f"\nround trip over {protocol}: fidelity mAP@0.5 {fidelity['map50']:.3f} on {fidelity['images']} "
              f"photos, {fidelity['gt_boxes']} teacher boxes")
        assert fidelity["gt_boxes"] >= 10
        assert fidelity["map50"] >= 0.99


@pytest.mark.parametrize("name", ["r30-fp32", "r30-int8"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pruned_student_is_served_faithfully(spec, variants, served, photos, name, protocol):
    expected = in_process(variants[name], served_spec(spec, name), photos, LOW_SCORE)
    total = 0
    for got, want in zip(served[name, protocol], expected):
        assert len(got.scores) == len(want.scores), got.file_name
        order_got, order_want = np.argsort(-got.scores, kind="stable"), np.argsort(-want.scores, kind="stable")
        np.testing.assert_allclose(got.scores[order_got], want.scores[order_want], atol=1e-4)
        np.testing.assert_allclose(np.sort(got.boxes, axis=0), np.sort(want.boxes, axis=0), atol=0.05)
        total += len(got.scores)
    print(f"\n{name} over {protocol}: {total} detections at score >= {LOW_SCORE} equal to in-process")
    assert total >= len(photos)


def test_each_pipeline_serves_its_variant(server, variants):
    assert_each_pipeline_serves_its_variant(server, variants, pipeline_name)
    assert variants["r30-fp32"].path.stat().st_size < 0.7 * variants["r0"].path.stat().st_size
    assert variants["r30-int8"].options["compress"]["prunable_channels_removed"] == pytest.approx(0.3, abs=0.05)
