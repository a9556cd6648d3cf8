"""OpenVINO variants served on the intel target by a real tritonserver, against the FP32 cpu pipeline
run in-process (decode, preprocess, ONNX Runtime FP32, postprocess).

Both must find the same objects (FP32's classes on this machine) with the same boxes; ov-int8 (NNCF, 5 calibration
photos, the default recipe of builder/optimize/openvino_variants.py with this CPU class's overflow fix) moves scores a
little (~0.04 on average on this model), so only ov-fp32 must also give every FP32 detection and FP32's scores.
"""
from __future__ import annotations

import time
from typing import Iterator

import pytest

from backends.detector.onnx_runner import make_session
from backends.postprocess.pipeline import postprocess_image
from backends.preprocess.image_ops import decode_image, prepare_input
from builder.device_class import host_class
from builder.optimize.int8_classes import settings_for
from builder.repository import render_repository, target_for
from builder.spec import load_spec
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests.conftest import IMAGES, SPEC
from tests.integration.conftest import assert_stopped
from tests.variants import OPENVINO_CALIBRATION_IMAGES

pytestmark = pytest.mark.integration

IMAGES_SERVED = ("astronaut.png", "dog.jpg", "horses.jpg")


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def reference(spec):
    """The cpu pipeline's FP32 result in-process: [(class name, score, box)] per image."""
    session = make_session(str(spec.model_path), intra_op_threads=1)

    def run(name: str):
        tensor, transform = prepare_input(decode_image((IMAGES / name).read_bytes(), spec.limits), spec.input)
        raw = session.run([spec.output.name], {spec.input_name: tensor[None]})[0][0]
        boxes, scores, classes = postprocess_image(
            raw, spec.output.format, transform, num_classes=len(spec.classes), score_threshold=spec.thresholds.score,
            iou_threshold=spec.thresholds.iou, max_detections=spec.thresholds.max_detections)
        return [(spec.classes[c], float(s), tuple(map(float, b))) for b, s, c in zip(boxes, scores, classes)]

    return {name: run(name) for name in IMAGES_SERVED}


@pytest.fixture(scope="module", params=["ov-fp32", "ov-int8"])
def served(request, spec, shared_variants, tmp_path_factory) -> Iterator[tuple[str, DetectionClient]]:
    """The variant built once per session (tests/variants.py, shared with test_openvino_variants), served."""
    tmp = tmp_path_factory.mktemp(request.param)
    started = time.perf_counter()
    if request.param == "ov-int8":
        variant = shared_variants.openvino_int8(settings_for(host_class()).openvino_overflow_fix,
                                                OPENVINO_CALIBRATION_IMAGES)
    else:
        variant = shared_variants.openvino("fp32")
    print(f"\n{variant.name} ready in {time.perf_counter() - started:.1f} s")
    intel = spec.replace(target="intel")
    # one detector instance (the target's default is 2): what is checked is what the variant answers, and batches
    repository = render_repository(intel, tmp / "model_repository", target_for(intel, detector_instances=1),
                                   variant=variant)
    server = TritonServer(repository, log_path=tmp / "tritonserver.log")
    with server:
        pid = server.pid
        with DetectionClient(server.grpc_url, "grpc") as client:
            yield request.param, client
    assert_stopped(pid)


@pytest.mark.parametrize("image_name", IMAGES_SERVED)
def test_served_variant_matches_fp32_pipeline(served, reference, image_name):
    variant, client = served
    result = client.detect((IMAGES / image_name).read_bytes())
    assert result.source == "edge" and not result.degraded
    expected = reference[image_name]
    assert expected, f"FP32 finds nothing on {image_name}: the image tests nothing"
    assert set(result.class_names) == {name for name, _, _ in expected}
    if variant == "ov-fp32":
        assert len(result.detections) == len(expected)
    tolerance = 0.01 if variant == "ov-fp32" else 0.15
    for det in result.detections:
        matches = [(name, score, box) for name, score, box in expected if name == det.class_name and iou(box, det.box) > 0.8]
        assert matches, f"{variant} {image_name}: {det} matches no FP32 box of its class"
        assert abs(matches[0][1] - det.score) < tolerance, (det, matches[0])
    if variant == "ov-fp32":  # and every FP32 detection is served
        for name, _, box in expected:
            assert any(d.class_name == name and iou(d.box, box) > 0.8 for d in result.detections), (name, box)


def test_served_variant_takes_a_batch(served):
    """Two images in one request: the fixed-batch-1 IR runs them one by one, same answers as alone."""
    _, client = served
    images = [(IMAGES / name).read_bytes() for name in ("horses.jpg", "dog.jpg")]
    batch = client.detect_batch(images)
    alone = [client.detect(data) for data in images]
    for together, single in zip(batch, alone):
        assert [(d.class_name, round(d.score, 4)) for d in together.detections] == \
               [(d.class_name, round(d.score, 4)) for d in single.detections]
