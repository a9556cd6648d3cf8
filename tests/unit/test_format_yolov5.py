"""backends.postprocess.formats.yolov5: [B, N, 5 + C] with objectness, on a graph built with onnx.helper
(tests/any_detector_models.py) and on hand-made tensors."""
from __future__ import annotations

import numpy as np
import pytest

from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.formats.yolov5 import decode_yolov5
from tests import any_detector_models as models

ROWS = np.array([[50, 40, 20, 10, 0.8, 0.1, 0.9], [10, 10, 4, 4, 0.2, 0.9, 0.1]], np.float32)


@pytest.mark.parametrize("white", [True, False])
def test_the_graph_decodes_to_the_scene(tmp_path, white):
    found = models.detect_in_process(models.write_spec(tmp_path, "yolov5"), white)
    models.assert_detections(found, 128, 96, white)


def test_score_is_objectness_times_the_best_class_and_boxes_are_corners():
    boxes, scores, class_ids = decode_yolov5(ROWS[None], 2)
    np.testing.assert_allclose(scores, [0.8 * 0.9, 0.2 * 0.9])
    assert class_ids.tolist() == [1, 0]
    np.testing.assert_allclose(boxes, [[40, 35, 60, 45], [8, 8, 12, 12]])


def test_threshold_normalised_boxes_and_class_offset():
    rows = ROWS.copy()
    rows[:, :4] = [[0.5, 0.5, 0.2, 0.1], [0.1, 0.1, 0.04, 0.04]]
    options = DecodeOptions(box_encoding="cxcywh", normalized=True, class_offset=1, input_height=100, input_width=200)
    boxes, scores, class_ids = decode_yolov5(rows, 2, score_threshold=0.1, options=options)
    # row 0: class column 1 less the offset is class 0; row 1's class column 0 is the background: dropped
    assert class_ids.tolist() == [0] and scores.tolist() == pytest.approx([0.72])
    np.testing.assert_allclose(boxes, [[80, 45, 120, 55]])


def test_wrong_tensors_and_shapes_are_named():
    with pytest.raises(InvalidTensorError, match=r"yolov5: expected \[N, 7\]"):
        decode_yolov5(ROWS[:, :6], 2)
    fmt = get_format("yolov5")
    assert fmt.check_shapes([(-1, -1, -1)], 80) is None and fmt.check_shapes([(1, 25200, 85)], 80) is None
    assert "[B, N, 85]" in fmt.check_shapes([(1, 84, 8400)], 80)
