"""The fixture photos through the served ensemble, over gRPC and HTTP, against an independent reference."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import MODEL

pytestmark = pytest.mark.integration

SCORE_THRESHOLD = 0.35
EXPECTED_CLASSES = {
    "dog.jpg": {"dog", "bicycle", "car"},
    "horses.jpg": {"horse"},
    "astronaut.png": {"person"},
    "camera.png": {"person"},
    "grace_hopper.jpg": {"person"},
    "eagle.jpg": {"bird"},
    "motorcycle_left.png": {"motorcycle"},
    "coffee.png": {"cup", "dining table"},
    "flower.jpg": set(),
    "scream.jpg": set(),
}

# Where each object's box centre must lie, as fractions of the picture (x_min, y_min, x_max, y_max).
EXPECTED_CENTRES = {
    "dog.jpg": {"car": (0.55, 0.0, 1.0, 0.4), "bicycle": (0.2, 0.2, 0.7, 0.7), "dog": (0.1, 0.4, 0.45, 0.9)},
    "astronaut.png": {"person": (0.2, 0.3, 0.6, 0.8)},
    "camera.png": {"person": (0.1, 0.3, 0.6, 0.8)},
}


def iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def reference():
    """The README's reference run, written independently of the backends: cv2 decode, plain bilinear
    resize to 512x512, FP32 ONNX Runtime, score > 0.35, no NMS; boxes scaled back to the picture."""
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])

    def run(path):
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        x = cv2.resize(image, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32)[None]
        raw = session.run(["tower_0/detections"], {"tower_0/images:0": x})[0][0]
        raw = raw[raw[:, 4] > SCORE_THRESHOLD]
        boxes = raw[:, :4] * np.array([w / 512, h / 512, w / 512, h / 512], dtype=np.float32)
        return boxes, raw[:, 4], raw[:, 5].astype(int), (w, h)

    return run


@pytest.mark.parametrize("image_name", sorted(EXPECTED_CLASSES))
def test_fixture_photo_classes_and_boxes(client, fixture_images, reference, image_name):
    path = fixture_images / image_name
    result = client.detect(path.read_bytes())
    assert result.source == "edge" and not result.degraded
    assert set(result.class_names) == EXPECTED_CLASSES[image_name]

    ref_boxes, ref_scores, ref_classes, (w, h) = reference(path)
    for det in result.detections:
        x1, y1, x2, y2 = det.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, f"{det} not inside the {w}x{h} picture"
        matches = [i for i in range(len(ref_boxes)) if ref_classes[i] == det.class_id and iou(ref_boxes[i], det.box) > 0.95]
        assert matches, f"{image_name}: served {det} matches no reference box of its class"
        assert abs(ref_scores[matches[0]] - det.score) < 0.02
    for name, (fx1, fy1, fx2, fy2) in EXPECTED_CENTRES.get(image_name, {}).items():
        boxes = [d.box for d in result.detections if d.class_name == name]
        assert boxes, f"{image_name}: no {name}"
        cx, cy = (boxes[0][0] + boxes[0][2]) / 2 / w, (boxes[0][1] + boxes[0][3]) / 2 / h
        assert fx1 <= cx <= fx2 and fy1 <= cy <= fy2, f"{image_name}: {name} centred at ({cx:.2f}, {cy:.2f})"


def test_horses_are_three_separate_boxes(client, fixture_images):
    result = client.detect((fixture_images / "horses.jpg").read_bytes())
    horses = [d.box for d in result.detections if d.class_name == "horse"]
    assert len(horses) == 3
    assert all(iou(a, b) < 0.5 for i, a in enumerate(horses) for b in horses[i + 1:])


@pytest.mark.parametrize("image_name", ["chelsea.png", "grace_hopper.jpg"])
def test_nms_removes_the_duplicates_the_raw_model_emits(client, fixture_images, reference, image_name):
    path = fixture_images / image_name
    ref_boxes, _, ref_classes, _ = reference(path)
    raw_duplicates = [(i, j) for i in range(len(ref_boxes)) for j in range(i + 1, len(ref_boxes))
                      if ref_classes[i] == ref_classes[j] and iou(ref_boxes[i], ref_boxes[j]) > 0.5]
    assert raw_duplicates, "the raw model emits overlapping duplicates for this picture"
    result = client.detect(path.read_bytes())
    assert len(result.detections) == len(ref_boxes) - len(raw_duplicates)
    served = result.detections
    assert not [(a, b) for i, a in enumerate(served) for b in served[i + 1:] if a.class_id == b.class_id and iou(a.box, b.box) > 0.5]


def test_several_images_in_one_request_match_single_requests(client, fixture_images):
    names = ["dog.jpg", "flower.jpg", "horses.jpg"]
    datas = [(fixture_images / n).read_bytes() for n in names]
    batched = client.detect_batch(datas)
    singles = [client.detect(d) for d in datas]
    assert [len(r.detections) for r in batched] == [len(r.detections) for r in singles] == [3, 0, 3]
    for b, s in zip(batched, singles):
        for db, ds in zip(b.detections, s.detections):
            assert db.class_name == ds.class_name
            assert np.allclose(db.box, ds.box, atol=0.5)


def test_concurrent_requests_are_batched_by_triton(edge_server, fixture_images):
    """The dynamic batcher groups concurrent requests into one execute() of the Python steps."""
    data = (fixture_images / "dog.jpg").read_bytes()
    stats_client = httpclient.InferenceServerClient(edge_server.http_url)
    from edgestack.client import DetectionClient

    def one(_):
        with DetectionClient(edge_server.grpc_url, "grpc") as c:
            return c.detect(data)

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        assert all(set(r.class_names) == {"dog", "bicycle", "car"} for r in results)
        stats = stats_client.get_inference_statistics("detect_preprocess")["model_stats"][0]
        batch_sizes = {int(b["batch_size"]) for b in stats["batch_stats"]}
        assert max(batch_sizes) > 1, f"no batched execution: {batch_sizes}"
    finally:
        stats_client.close()
