"""backends.postprocess.formats.rtdetr: per-query logits [B, Q, C] + normalised cx cy w h boxes, on a graph built
with onnx.helper (tests/any_detector_models.py) and on hand-made tensors."""
from __future__ import annotations

import numpy as np
import pytest

from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.formats.rtdetr import DEFAULTS, decode_rtdetr
from tests import any_detector_models as models

OPTIONS = DecodeOptions(**DEFAULTS, input_height=100, input_width=200)
LOGITS = np.array([[2.0, -1.0], [-3.0, 0.0]], np.float32)
BOXES = np.array([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.1, 0.1]], np.float32)


@pytest.mark.parametrize("white", [True, False])
def test_the_graph_decodes_to_the_scene(tmp_path, white):
    found = models.detect_in_process(models.write_spec(tmp_path, "rtdetr"), white)
    models.assert_detections(found, 128, 96, white)


def test_sigmoid_of_the_best_logit_and_pixel_corners():
    boxes, scores, class_ids = decode_rtdetr(LOGITS, BOXES, 2, options=OPTIONS)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.array([2.0, 0.0]))), rtol=1e-6)
    assert class_ids.tolist() == [0, 1]
    np.testing.assert_allclose(boxes, [[80, 30, 120, 70], [40, 20, 60, 30]], atol=1e-4)


def test_probabilities_need_no_activation_and_the_threshold_applies():
    probabilities = DecodeOptions(**{**DEFAULTS, "score_activation": "none"}, input_height=100, input_width=200)
    _, scores, class_ids = decode_rtdetr(np.array([[0.7, 0.1], [0.2, 0.3]], np.float32), BOXES, 2,
                                         score_threshold=0.5, options=probabilities)
    assert scores.tolist() == pytest.approx([0.7]) and class_ids.tolist() == [0]


def test_wrong_tensors_and_shapes_are_named():
    with pytest.raises(InvalidTensorError, match=r"rtdetr logits: expected \[N, 3\]"):
        decode_rtdetr(LOGITS, BOXES, 3, options=OPTIONS)
    with pytest.raises(InvalidTensorError, match="2 queries of logits but 1 boxes"):
        decode_rtdetr(LOGITS, BOXES[:1], 2, options=OPTIONS)
    check = get_format("rtdetr").check_shapes
    assert check([(-1, 300, 80), (-1, 300, 4)], 80) is None
    assert "C = 80 classes" in check([(1, 300, 81), (1, 300, 4)], 80)
    assert "300 queries of logits but 100 boxes" in check([(1, 300, 80), (1, 100, 4)], 80)
