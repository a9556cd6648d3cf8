"""ONNX Runtime INT8 variants served by one real tritonserver, against FP32 run in-process.

Each INT8 variant is built with builder.optimize (decode tail float and this machine's CPU-class settings,
builder/optimize/int8_classes.py, as `edgestack optimize` builds them) on the
first CALIBRATION_IMAGES fixture photos and served on the cpu target, all four in one repository (one pipeline
each, so one server start). The other fixture photos go through every pipeline over gRPC and over HTTP;
fidelity is pycocotools' mAP@0.5 of the served detections against FP32's own detections (score >= the spec's
0.35) as ground truth: builder.optimize.evaluate.fidelity_map, the number `edgestack optimize` reports. The
pipelines are rendered with the score threshold lowered to evaluate.MAP_SCORE_THRESHOLD so that, as in
`edgestack optimize`, average precision sees the ranking below the serving threshold.

Floors, from measurements on this machine (3 calibration images, 11 held-out images, 19 FP32 boxes):
- int8-minmax 0.83, int8-percentile 0.84: floor 0.6; int8-entropy (the KL search of builder/optimize/ort_entropy.py,
  which clips activation tails harder than min/max) 0.60: floor 0.4. Low enough for run-to-run and CPU-to-CPU
  differences of ORT's kernels (each lost box of 19 costs ~0.05), high enough to catch a broken quantization: with the decode tail
  quantized too, scores collapse to 0 or 2 and the fidelity is ~0 (test_quantized_decode_tail_fails_every_floor
  measures it on the same images).
- int8-mean-quantile (the FAST_INT8 recipe: mean-quantile ranges, Resize float, scalar Muls folded) 0.99 (1.00
  with 5 calibration images): floor `edgestack optimize`'s default accuracy floor (0.9), above what ORT's own
  calibrators reach, so the test fails if the recipe loses its fidelity advantage.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from backends.common import tensors as T

from backends.common.files import image_files
from backends.detector.onnx_runner import OnnxDetector, make_session
from builder.device_class import host_class
from builder.optimize import evaluate
from builder.optimize import ort_variants as ov
from builder.optimize.evaluate import ImageDetections
from builder.optimize.int8_classes import settings_for
from builder.optimize.pipeline import DEFAULT_ACCURACY_FLOOR
from builder.optimize.variants import Variant
from builder.repository import PIPELINE_FILE_SUFFIX, render_repository, target_for
from builder.spec import load_spec
from edgestack.server import TritonServer
from ensembles import render_pipeline
from tests.conftest import IMAGES, ROOT, SPEC
from tests.integration.conftest import assert_each_pipeline_serves_its_variant, assert_stopped, served_detections
from tests.variants import ORT_CALIBRATION_IMAGES

pytestmark = pytest.mark.integration

CALIBRATION_IMAGES = ORT_CALIBRATION_IMAGES  # 3
# variant -> (QuantOptions fields besides the decode tail, fidelity mAP@0.5 floor); see the module docstring
VARIANTS = {
    "int8-minmax": ({"calibration": "minmax"}, 0.6),
    "int8-entropy": ({"calibration": "entropy"}, 0.4),
    "int8-percentile": ({"calibration": "percentile"}, 0.6),
    "int8-mean-quantile": (ov.FAST_INT8, DEFAULT_ACCURACY_FLOOR),
}
ISA = settings_for(host_class()).ort


CASCADE, CASCADE_VARIANT = "cascade_int8", "int8-mean-quantile"  # a cascade whose precise stage serves this variant
CASCADE_SPEC = ROOT / "specs" / "centernet_cascade.yaml"


def pipeline_name(variant: str) -> str:
    return "detect_" + variant.replace("-", "_")


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def eval_images() -> list[Path]:
    """The fixture photos not used for calibration (load_calibration_set takes the first ones by name)."""
    photos = image_files(IMAGES)
    return photos[CALIBRATION_IMAGES:]


@pytest.fixture(scope="module")
def fp32_reference(spec, eval_images) -> list[ImageDetections]:
    """FP32 in-process, the same functions the server runs, down to the low mAP threshold."""
    runner = OnnxDetector(make_session(str(spec.model_path), 1), spec.input_name, spec.output.name, 1)
    return evaluate.detect_images(runner, spec, eval_images)


@pytest.fixture(scope="module")
def variants(spec, shared_variants) -> dict[str, Variant]:
    """Built once per session (tests/variants.py): test_ort_variants and test_int8_emulated share some of them."""
    head = ov.default_head_exclusions(spec.model_path)
    built = {}
    for name, (fields, _) in VARIANTS.items():
        started = time.perf_counter()
        options = ov.QuantOptions(**fields, **ISA, exclude_nodes=head)
        built[name] = shared_variants.ort_int8(options, CALIBRATION_IMAGES)
        print(f"\n{name} ({options.name}) ready in {time.perf_counter() - started:.1f} s")
    return built


@pytest.fixture(scope="module")
def server(spec, variants, tmp_path_factory) -> Iterator[TritonServer]:
    """One tritonserver, one pipeline per variant in one repository."""
    tmp = tmp_path_factory.mktemp("int8_served")
    repository = tmp / "model_repository"
    low = dataclasses.replace(spec.thresholds, score=evaluate.MAP_SCORE_THRESHOLD)
    for name, variant in variants.items():
        served = spec.replace(name=pipeline_name(name), thresholds=low)
        # one detector instance each (the target's default is 2): what is checked is what each pipeline answers
        render_repository(served, repository, target_for(served, detector_instances=1), variant=variant)
    cascade = load_spec(CASCADE_SPEC)
    cascade = cascade.replace(name=CASCADE, thresholds=dataclasses.replace(cascade.thresholds, score=low.score))
    render_pipeline(cascade, repository, target_for(cascade, detector_instances=1, preprocess_instances=1),
                    variant=variants[CASCADE_VARIANT])
    started = time.perf_counter()
    with TritonServer(repository, log_path=tmp / "tritonserver.log") as running:
        print(f"\ntritonserver with {len(variants)} pipelines ready in {time.perf_counter() - started:.1f} s")
        pid = running.pid
        yield running
    assert_stopped(pid)


@pytest.fixture(scope="module")
def served(server, variants, eval_images, fp32_reference) -> dict[tuple[str, str], list[ImageDetections]]:
    """(variant, protocol) -> detections per evaluation image, as the server answered them."""
    return served_detections(server, variants, pipeline_name, eval_images, fp32_reference)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_served_int8_stays_close_to_fp32(spec, served, fp32_reference, name):
    floor = VARIANTS[name][1]
    fidelity = evaluate.fidelity_map(fp32_reference, served[name, "grpc"],
                                     reference_score_threshold=spec.thresholds.score)
    print(f"\n{name}: fidelity mAP@0.5 {fidelity['map50']:.3f} (mAP@0.5:0.95 {fidelity['map50_95']:.3f}) "
          f"on {fidelity['images']} images, {fidelity['gt_boxes']} FP32 boxes; floor {floor}")
    assert fidelity["gt_boxes"] >= 10  # enough FP32 boxes for the floor to mean something
    assert fidelity["map50"] >= floor


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_http_answers_like_grpc(served, name):
    for over_grpc, over_http in zip(served[name, "grpc"], served[name, "http"]):
        np.testing.assert_array_equal(over_http.class_ids, over_grpc.class_ids)
        np.testing.assert_allclose(over_http.scores, over_grpc.scores, atol=1e-6)
        np.testing.assert_allclose(over_http.boxes, over_grpc.boxes, atol=1e-3)


def test_each_pipeline_serves_its_own_int8_model(server, variants):
    """The repository records which variant file each pipeline's detector serves, and the server has them all."""
    assert_each_pipeline_serves_its_variant(server, variants, pipeline_name)
    recipe = variants["int8-mean-quantile"].options
    assert recipe["quantized_ops"]["executed"]["integer_ops"]["QLinearConv"] == 89
    assert recipe["resize_executed"] == {"float": 3, "integer": 0}


def test_quantized_decode_tail_fails_every_floor(spec, shared_variants, eval_images, fp32_reference):
    """The negative control for the floors: min/max INT8 with the decode tail quantized too (no exclusions)."""
    broken = shared_variants.ort_int8(ov.QuantOptions(calibration="minmax"), CALIBRATION_IMAGES)
    runner = OnnxDetector(make_session(str(broken.path), 1), spec.input_name, spec.output.name, 1)
    fidelity = evaluate.fidelity_map(fp32_reference, evaluate.detect_images(runner, spec, eval_images),
                                     reference_score_threshold=spec.thresholds.score)
    print(f"\ndecode tail quantized: fidelity mAP@0.5 {fidelity['map50']:.3f}")
    assert fidelity["map50"] < min(floor for _, floor in VARIANTS.values()) / 2


def test_a_cascade_serves_the_int8_variant_in_its_precise_stage(server, variants, served, eval_images):
    """Images the cascade's fast stage is unsure of are answered by its precise stage: the INT8 variant, answering
    as the single pipeline serving the same variant does."""
    from tests.integration.pipeline_support import infer_batch

    record = json.loads((server.repository / f"{CASCADE}{PIPELINE_FILE_SUFFIX}").read_text())
    assert record["variants"]["precise"]["files_sha256"]["model.onnx"] == variants[CASCADE_VARIANT].options["sha256"]
    assert "fast" not in record["variants"]
    precise = 0
    for path, single in zip(eval_images, served[CASCADE_VARIANT, "grpc"]):
        answer, = infer_batch(server.grpc_url, "grpc", CASCADE, [path.read_bytes()], extra=[T.STAGE])
        if answer[T.STAGE] != "precise":
            continue
        precise += 1
        assert len(answer["scores"]) == len(single.scores)
        np.testing.assert_allclose(answer["scores"], np.asarray(single.scores).reshape(-1), atol=1e-5)
        np.testing.assert_allclose(answer["boxes"], np.asarray(single.boxes).reshape(-1, 4), atol=1e-2)
    assert precise > 0
