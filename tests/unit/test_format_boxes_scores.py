"""backends.postprocess.formats.boxes_scores: the two-output format (boxes [B, N, 4] + scores [B, N, C])."""
from __future__ import annotations

import numpy as np
import pytest

from backends.common.geometry import compute_transform
from backends.errors import InvalidTensorError
from backends.postprocess.formats import FORMATS, get_format
from backends.postprocess.formats.boxes_scores import decode_boxes_scores
from backends.postprocess.pipeline import postprocess_image

BOXES = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [100, 100, 150, 140], [0, 0, 5, 5]], np.float32)
SCORES = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.05, 0.1, 0.6], [0.1, 0.2, 0.3]], np.float32)


def test_registered_with_two_roles_in_order():
    fmt = get_format("boxes_scores")
    assert FORMATS["boxes_scores"] is fmt
    assert fmt.outputs == ("boxes", "scores")


def test_decode_keeps_each_candidates_best_class():
    boxes, scores, class_ids = decode_boxes_scores(BOXES[None], SCORES[None], 3)
    np.testing.assert_array_equal(boxes, BOXES)
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6, 0.3])
    assert class_ids.tolist() == [0, 1, 2, 2]
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and class_ids.dtype == np.int32


def test_decode_applies_the_score_threshold_and_drops_non_finite_candidates():
    boxes = BOXES.copy()
    boxes[2, 0] = np.nan
    kept_boxes, kept_scores, kept_ids = get_format("boxes_scores").decode([boxes, SCORES], 3, score_threshold=0.5)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7]) and kept_ids.tolist() == [0, 1]
    np.testing.assert_array_equal(kept_boxes, BOXES[:2])


def test_decode_of_no_candidates_is_empty():
    boxes, scores, class_ids = decode_boxes_scores(np.zeros((1, 0, 4), np.float32), np.zeros((1, 0, 3), np.float32), 3)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and class_ids.shape == (0,)


@pytest.mark.parametrize("boxes, scores, message", [
    (BOXES[:, :3], SCORES, "expected boxes [N, 4]"),
    (BOXES, SCORES[:, :2], "expected scores [4, 3]"),
    (BOXES, SCORES[:3], "expected scores [4, 3]"),
    (BOXES[None, None], SCORES, "expected a 2-D tensor"),
    (BOXES, SCORES.astype(str), "expected a numeric tensor"),
])
def test_decode_refuses_wrong_tensors(boxes, scores, message):
    with pytest.raises(InvalidTensorError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_boxes_scores(boxes, scores, 3)


@pytest.mark.parametrize("shapes, classes, problem", [
    (((-1, -1, 4), (-1, -1, 80)), 80, None),
    (((1, 100, 4), (1, 100, -1)), 80, None),
    (((1, 100, 4), (1, 100, 80)), 80, None),
    (((1, 100, 5), (1, 100, 80)), 80, "needs boxes [B, N, 4]"),
    (((100, 4), (1, 100, 80)), 80, "needs boxes [B, N, 4]"),
    (((1, 100, 4), (1, 100, 81)), 80, "needs scores [B, N, C] with C = 80"),
    (((1, 100, 4), (1, 90, 80)), 80, "100 boxes but 90 rows of scores"),
])
def test_shape_checks_agree_with_the_decoder(shapes, classes, problem):
    result = get_format("boxes_scores").check_shapes(list(shapes), classes)
    assert (result is None) if problem is None else (problem in result)
    if problem is None and all(-1 not in shape for shape in shapes):  # what the build accepts, the decoder reads
        get_format("boxes_scores").decode([np.zeros(shape, np.float32) for shape in shapes], classes)


def test_postprocess_image_with_both_tensors_nms_and_mapping_back():
    """Two boxes of different classes overlap (both kept: NMS is per class); a 2x stretch maps them back."""
    transform = compute_transform(400, 400, 200, 200, "stretch")  # original 400x400 -> model 200x200
    boxes, scores, class_ids = postprocess_image([BOXES[None], SCORES[None]], "boxes_scores", transform, num_classes=3,
                                                 score_threshold=0.25, iou_threshold=0.5, max_detections=10)
    assert class_ids.tolist() == [0, 1, 2, 2] and scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.3])
    np.testing.assert_allclose(boxes, BOXES * 2)
    with pytest.raises(InvalidTensorError, match="reads 2 output tensor"):
        postprocess_image(BOXES[None], "boxes_scores", transform, num_classes=3, score_threshold=0.25,
                          iou_threshold=0.5, max_detections=10)
