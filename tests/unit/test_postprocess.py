"""Postprocess math: decoders, NMS (checked against OpenCV's cv2.dnn NMS), and the per-image pipeline."""
import cv2
import numpy as np
import pytest

from backends.common.geometry import Transform, compute_transform
from backends.errors import InvalidTensorError
from backends.postprocess.formats import FORMATS
from backends.postprocess.formats.detections import decode_detections
from backends.postprocess.formats.yolov8 import decode_yolov8
from backends.postprocess.nms import batched_nms, nms
from backends.postprocess.pipeline import postprocess_image

IOU_THRESHOLDS = [0.1, 0.3, 0.45, 0.5, 0.7, 0.9]


def random_boxes(rng, n, heavy_overlap):
    """n x1y1x2y2 boxes; heavy_overlap draws them as jittered copies of a few cluster centres."""
    if heavy_overlap:
        centres = rng.uniform(50, 450, size=(max(1, n // 8), 4))
        centres[:, 2:] = centres[:, :2] + rng.uniform(20, 120, size=(len(centres), 2))
        boxes = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, size=(n, 4))
    else:
        xy = rng.uniform(0, 500, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 150, size=(n, 2))], axis=1)
    lo, hi = np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])
    return np.concatenate([lo, hi + 1.0], axis=1).astype(np.float32)


def to_xywh(boxes):
    return [(float(x1), float(y1), float(x2 - x1), float(y2 - y1)) for x1, y1, x2, y2 in boxes]


def cv2_nms(boxes, scores, iou):
    kept = cv2.dnn.NMSBoxes(to_xywh(boxes), scores.tolist(), 0.0, iou)
    return np.asarray(kept, dtype=np.int64).reshape(-1)


def cv2_batched_nms(boxes, scores, class_ids, iou):
    if hasattr(cv2.dnn, "NMSBoxesBatched"):
        kept = cv2.dnn.NMSBoxesBatched(to_xywh(boxes), scores.tolist(), class_ids.tolist(), 0.0, iou)
        return np.asarray(kept, dtype=np.int64).reshape(-1)
    kept = [np.flatnonzero(class_ids == c)[cv2_nms(boxes[class_ids == c], scores[class_ids == c], iou)]
            for c in np.unique(class_ids)]
    kept = np.concatenate(kept) if kept else np.empty(0, np.int64)
    return kept[np.argsort(-scores[kept], kind="stable")]


CASES = [(seed, n, heavy) for seed in range(12) for n in (1, 2, 7, 40, 200) for heavy in (False, True)]


@pytest.mark.parametrize("iou", IOU_THRESHOLDS)
def test_nms_matches_opencv(iou):
    total_suppressed = 0
    for seed, n, heavy in CASES:
        rng = np.random.default_rng(seed * 1000 + n)
        boxes = random_boxes(rng, n, heavy)
        scores = rng.uniform(0.01, 1.0, n).astype(np.float32)  # all above the 0.0 cv2 threshold
        kept = nms(boxes, scores, iou)
        assert kept.dtype == np.int64
        expected = cv2_nms(boxes, scores, iou)
        assert set(kept.tolist()) == set(expected.tolist()), (seed, n, heavy)
        assert np.all(np.diff(scores[kept]) <= 0), "kept indices must be in descending score order"
        total_suppressed += n - kept.size
    assert total_suppressed > 0, "the random cases should exercise suppression"


@pytest.mark.parametrize("iou", IOU_THRESHOLDS)
def test_batched_nms_matches_opencv(iou):
    for seed, n, heavy in CASES:
        rng = np.random.default_rng(seed * 7919 + n)
        boxes = random_boxes(rng, n, heavy)
        scores = rng.uniform(0.01, 1.0, n).astype(np.float32)  # all above the 0.0 cv2 threshold
        class_ids = rng.integers(0, 4, n).astype(np.int32)
        kept = batched_nms(boxes, scores, class_ids, iou)
        expected = cv2_batched_nms(boxes, scores, class_ids, iou)
        assert set(kept.tolist()) == set(expected.tolist()), (seed, n, heavy)
        assert np.all(np.diff(scores[kept]) <= 0)
        agnostic = batched_nms(boxes, scores, class_ids, iou, class_agnostic=True)
        assert set(agnostic.tolist()) == set(cv2_nms(boxes, scores, iou).tolist())


def test_nms_handcrafted_and_empty():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.8, 0.9, 0.5], np.float32)
    # IoU(0, 1) = 90 / 110 ~ 0.818: suppressed at 0.5, both kept at 0.85.
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.85).tolist() == [1, 0, 2]
    assert batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist() == [1, 0, 2]
    empty = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5)
    assert empty.dtype == np.int64 and empty.shape == (0,)
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int32), 0.5).shape == (0,)


def test_batched_nms_large_class_ids_and_negative_coordinates():
    boxes = np.array([[-50, -50, -10, -10], [-49, -50, -9, -10], [-50, -50, -10, -10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    class_ids = np.array([2_000_000_000, 2_000_000_000, 5], np.int64)
    assert batched_nms(boxes, scores, class_ids, 0.5).tolist() == [0, 2]


# ---------------------------------------------------------------- decoders


def test_decode_detections_handcrafted():
    raw = np.array(
        [
            [10, 20, 30, 60, 0.9, 2],
            [50, 40, 5, 10, 0.6, 0],  # corners swapped on both axes
            [0, 0, 8, 8, 0.1, 1],
        ],
        np.float64,
    )
    boxes, scores, class_ids = decode_detections(raw)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and class_ids.dtype == np.int32
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 60], [5, 10, 50, 40], [0, 0, 8, 8]])
    np.testing.assert_allclose(scores, [0.9, 0.6, 0.1], rtol=1e-6)
    assert class_ids.tolist() == [2, 0, 1]

    boxes, scores, class_ids = decode_detections(raw[None], 3, score_threshold=0.5)
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 60], [5, 10, 50, 40]])
    assert class_ids.tolist() == [2, 0]
    # Strictly greater: a score equal to the threshold is dropped.
    assert decode_detections(raw, 3, score_threshold=0.6)[2].tolist() == [2]


def test_decode_detections_rejects_bad_tensors():
    with pytest.raises(InvalidTensorError):
        decode_detections(np.zeros((3, 5), np.float32))
    with pytest.raises(InvalidTensorError):
        decode_detections(np.zeros((2, 3, 6), np.float32))
    with pytest.raises(InvalidTensorError, match="class index"):
        decode_detections(np.array([[0, 0, 1, 1, 0.9, 7]], np.float32), 3)
    boxes, scores, class_ids = decode_detections(np.zeros((0, 6), np.float32))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and class_ids.shape == (0,)


def yolov8_tensor():
    """[4 + 3, 4]: three classes, four candidates."""
    cx = [100, 200, 50, 10]
    cy = [80, 40, 50, 10]
    w = [20, 40, 10, 4]
    h = [10, 60, 30, 4]
    cls = [
        [0.10, 0.70, 0.20, 0.01],
        [0.85, 0.05, 0.30, 0.02],
        [0.05, 0.20, 0.35, 0.03],
    ]
    return np.array([cx, cy, w, h, *cls], np.float32)


def test_decode_yolov8_handcrafted():
    raw = yolov8_tensor()
    boxes, scores, class_ids = decode_yolov8(raw, 3)
    np.testing.assert_allclose(
        boxes, [[90, 75, 110, 85], [180, 10, 220, 70], [45, 35, 55, 65], [8, 8, 12, 12]]
    )
    np.testing.assert_allclose(scores, [0.85, 0.70, 0.35, 0.03], rtol=1e-6)
    assert class_ids.tolist() == [1, 0, 2, 2]
    assert boxes.dtype == np.float32 and class_ids.dtype == np.int32

    boxes_t, scores_t, classes_t = decode_yolov8(raw, 3, score_threshold=0.3)
    np.testing.assert_allclose(boxes_t, [[90, 75, 110, 85], [180, 10, 220, 70], [45, 35, 55, 65]])
    assert classes_t.tolist() == [1, 0, 2]

    for variant in (raw[None], np.ascontiguousarray(raw.T), raw.T[None]):
        got = decode_yolov8(variant, 3, score_threshold=0.3)
        np.testing.assert_allclose(got[0], boxes_t)
        np.testing.assert_allclose(got[1], scores_t)
        assert got[2].tolist() == classes_t.tolist()


def test_decode_yolov8_many_survivors_matches_argmax():
    rng = np.random.default_rng(3)
    raw = rng.random((4 + 80, 8400), dtype=np.float32)
    for thr in (None, 0.5, 0.99):
        _, scores, class_ids = decode_yolov8(raw, 80, score_threshold=thr)
        full_max, full_arg = raw[4:].max(axis=0), raw[4:].argmax(axis=0)
        mask = np.ones(8400, bool) if thr is None else full_max > thr
        np.testing.assert_array_equal(scores, full_max[mask])
        np.testing.assert_array_equal(class_ids, full_arg[mask])


def test_decode_yolov8_wrong_channel_count_raises():
    with pytest.raises(InvalidTensorError, match="4 \\+ num_classes"):
        decode_yolov8(yolov8_tensor(), 80)
    with pytest.raises(InvalidTensorError):
        decode_yolov8(np.zeros((1, 84, 8400, 1), np.float32), 80)


def test_format_registry_uniform_signature():
    assert {"detections", "yolov8", "boxes_scores", "yolov5", "tf_od_api", "torchvision", "rtdetr", "yolox"} <= set(FORMATS)
    assert FORMATS["yolov8"].decode([yolov8_tensor()], 3)[2].tolist() == [1, 0, 2, 2]
    assert FORMATS["detections"].decode([np.array([[0, 0, 1, 1, 0.5, 1]])], 3)[2].tolist() == [1]
    assert all(len(f.outputs) >= 1 and f.summary for f in FORMATS.values())


@pytest.mark.parametrize("name, shape, classes, problem", [
    ("detections", (-1, -1, 6), 80, None),
    ("detections", (1, 100, 7), 80, "needs an output [B, K, 6]"),
    ("detections", (1, 600), 80, "needs an output [B, K, 6]"),
    ("yolov8", (1, 84, 8400), 80, None),
    ("yolov8", (1, 8400, 84), 80, None),  # transposed export: decode_yolov8 reads it too
    ("yolov8", (-1, 7, -1), 3, None),
    ("yolov8", (1, 84, 8400), 3, "no dimension of 4 + C = 7"),
    ("yolov8", (84, 8400), 80, "needs an output [B, 4 + C, N] or [B, N, 4 + C]"),
])
def test_format_shape_checks_agree_with_the_decoders(name, shape, classes, problem):
    result = FORMATS[name].check_shapes([shape], classes)
    assert (result is None) if problem is None else (problem in result)
    if problem is None and -1 not in shape:  # what the build accepts, the decoder reads
        FORMATS[name].decode([np.zeros(shape, np.float32)], classes)


def test_postprocess_refuses_unknown_format_and_wrong_tensor_count():
    with pytest.raises(InvalidTensorError, match="unknown output format 'ssd'; known: boxes_scores, detections, rtdetr, "):
        postprocess_image(np.zeros((1, 6), np.float32), "ssd", IDENTITY, **KW)
    with pytest.raises(InvalidTensorError, match="reads 1 output tensor"):
        postprocess_image([np.zeros((1, 6), np.float32)] * 2, "detections", IDENTITY, **KW)


# ---------------------------------------------------------------- pipeline

IDENTITY = compute_transform(640, 640, 640, 640, "stretch")
KW = dict(num_classes=3, score_threshold=0.25, iou_threshold=0.5, max_detections=100)


def test_pipeline_nms_removes_duplicates_keeps_other_classes():
    raw = np.array(
        [
            [100, 100, 200, 200, 0.9, 0],
            [102, 101, 201, 203, 0.8, 0],  # duplicate of the first, same class
            [101, 100, 199, 200, 0.7, 1],  # same place, other class
            [300, 300, 350, 360, 0.2, 0],  # below the score threshold
        ],
        np.float32,
    )
    boxes, scores, class_ids = postprocess_image(raw, "detections", IDENTITY, **KW)
    np.testing.assert_allclose(boxes, [[100, 100, 200, 200], [101, 100, 199, 200]])
    np.testing.assert_allclose(scores, [0.9, 0.7], rtol=1e-6)
    assert class_ids.tolist() == [0, 1]

    _, _, agnostic_ids = postprocess_image(raw, "detections", IDENTITY, **KW, class_agnostic=True)
    assert agnostic_ids.tolist() == [0]


def test_pipeline_max_detections_and_score_order():
    scores = np.array([0.3, 0.9, 0.5, 0.7, 0.6, 0.8], np.float32)
    raw = np.array([[i * 50, 0, i * 50 + 40, 40, s, 0] for i, s in enumerate(scores)], np.float32)
    boxes, got_scores, _ = postprocess_image(raw, "detections", IDENTITY, **{**KW, "max_detections": 3})
    np.testing.assert_allclose(got_scores, [0.9, 0.8, 0.7], rtol=1e-6)
    np.testing.assert_allclose(boxes[:, 0], [50, 250, 150])
    assert postprocess_image(raw, "detections", IDENTITY, **{**KW, "max_detections": 0})[0].shape == (0, 4)


def test_pipeline_stretch_transform_maps_back():
    # 480x320 (h x w) image stretched to 640x640: x scale 2, y scale 4/3.
    transform = compute_transform(480, 320, 640, 640, "stretch")
    raw = np.array([[64, 128, 320, 512, 0.9, 2]], np.float32)
    boxes, _, class_ids = postprocess_image(raw, "detections", transform, **KW)
    np.testing.assert_allclose(boxes, [[32, 96, 160, 384]], rtol=1e-5)
    assert class_ids.tolist() == [2]


def test_pipeline_letterbox_transform_maps_back_and_clips():
    # 480x640 (h x w) into 640x640: scale 1, pad_y = 80.
    transform = compute_transform(480, 640, 640, 640, "letterbox")
    assert (transform.scale_x, transform.scale_y, transform.pad_x, transform.pad_y) == (1.0, 1.0, 0.0, 80.0)
    raw = np.array(
        [
            [100, 180, 300, 380, 0.9, 0],  # inside -> y shifted by -80
            [600, 20, 700, 200, 0.8, 1],  # crosses the top padding and the right edge -> clipped
            [10, 0, 60, 70, 0.7, 2],  # entirely in the top padding -> empty after clipping, dropped
        ],
        np.float32,
    )
    boxes, scores, class_ids = postprocess_image(raw, "detections", transform, **KW)
    np.testing.assert_allclose(boxes, [[100, 100, 300, 300], [600, 0, 640, 120]], rtol=1e-6)
    assert class_ids.tolist() == [0, 1]

    # Downscaling letterbox: 1280x960 (h x w) into 640x640 -> scale 0.5, pad_x = 80.
    transform = compute_transform(1280, 960, 640, 640, "letterbox")
    raw = np.array([[130, 50, 230, 250, 0.9, 0]], np.float32)
    boxes, _, _ = postprocess_image(raw, "detections", transform.to_array(), **KW)
    np.testing.assert_allclose(boxes, [[100, 100, 300, 500]], rtol=1e-5)


def test_pipeline_yolov8_end_to_end():
    transform = Transform(orig_h=40, orig_w=80, scale_x=2.0, scale_y=2.0, pad_x=0.0, pad_y=0.0,
                          resized_w=160, resized_h=80)
    raw = yolov8_tensor()[None]
    boxes, scores, class_ids = postprocess_image(raw, "yolov8", transform, **KW)
    # Candidate 0 is clipped at the bottom (y2 42.5 -> 40); candidate 1 maps to x 90..110, right of
    # the 80-wide image: empty after clipping, dropped.
    np.testing.assert_allclose(boxes, [[45, 37.5, 55, 40], [22.5, 17.5, 27.5, 32.5]], rtol=1e-6)
    np.testing.assert_allclose(scores, [0.85, 0.35], rtol=1e-6)
    assert class_ids.tolist() == [1, 2]


def test_pipeline_empty_and_unknown_format():
    boxes, scores, class_ids = postprocess_image(np.zeros((0, 6), np.float32), "detections", IDENTITY, **KW)
    assert (boxes.shape, boxes.dtype) == ((0, 4), np.float32)
    assert (scores.shape, scores.dtype) == ((0,), np.float32)
    assert (class_ids.shape, class_ids.dtype) == ((0,), np.int32)
    low = np.array([[0, 0, 10, 10, 0.25, 0]], np.float32)  # score == threshold -> dropped
    assert postprocess_image(low, "detections", IDENTITY, **KW)[0].shape == (0, 4)
    with pytest.raises(InvalidTensorError, match="detections.*yolov8"):
        postprocess_image(low, "ssd", IDENTITY, **KW)
