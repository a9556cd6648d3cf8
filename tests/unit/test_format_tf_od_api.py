"""backends.postprocess.formats.tf_od_api: the TF Object Detection API's four outputs (num_detections, normalised
y1 x1 y2 x2 boxes, scores, float class ids from 1), on a uint8 NHWC graph of any size built with onnx.helper."""
from __future__ import annotations

import numpy as np
import pytest

from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.formats.tf_od_api import decode_tf_od_api
from builder.spec import load_spec
from tests import any_detector_models as models

TF = DecodeOptions(box_encoding="yxyx", normalized=True, class_offset=1, input_height=100, input_width=200)
BOXES = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.4]], np.float32)


@pytest.mark.parametrize("white", [True, False])
def test_the_graph_decodes_to_the_scene_ignoring_rows_past_num_detections(tmp_path, white):
    found = models.detect_in_process(models.write_spec(tmp_path, "tf_od_api"), white)
    models.assert_detections(found, 128, 96, white)  # padding row 5 has score 0.99: not a detection


def test_the_spec_takes_the_tf_conventions_by_default(tmp_path):
    spec = load_spec(models.write_spec(tmp_path, "tf_od_api"))
    assert (spec.decode_options.box_encoding, spec.decode_options.normalized, spec.decode_options.class_offset) == (
        "yxyx", True, 1)
    assert (spec.decode_options.input_height, spec.decode_options.input_width) == (models.HEIGHT, models.WIDTH)
    assert spec.input.dtype == "uint8" and spec.input.layout == "NHWC"


def test_decode_reads_num_detections_rows_scales_and_offsets():
    boxes, scores, class_ids = decode_tf_od_api(np.array([2.0]), BOXES, np.array([0.9, 0.5, 0.99], np.float32),
                                                np.array([1.0, 3.0, 2.0], np.float32), 3, options=TF)
    np.testing.assert_allclose(boxes, [[40, 10, 120, 50], [0, 0, 200, 100]])
    assert scores.tolist() == pytest.approx([0.9, 0.5]) and class_ids.tolist() == [0, 2]


@pytest.mark.parametrize("count, classes, message", [
    ([4.0], [1.0, 1.0, 1.0], "num_detections 4 is over the 3 rows"),
    ([-1.0], [1.0, 1.0, 1.0], "one non-negative count per image"),
    ([3.0], [1.0, 4.0, 1.0], "class id 4 is outside the spec's 3 classes"),
    ([3.0], [0.0, 1.0, 1.0], "class id 0 is outside"),
])
def test_decode_refuses_wrong_tensors_by_name(count, classes, message):
    with pytest.raises(InvalidTensorError, match=message):
        decode_tf_od_api(np.array(count), BOXES, np.ones(3, np.float32), np.array(classes, np.float32), 3, options=TF)


def test_shape_checks():
    check = get_format("tf_od_api").check_shapes
    assert check([(-1,), (-1, -1, 4), (-1, -1), (-1, -1)], 90) is None
    assert check([(1, 1), (1, 100, 4), (1, 100), (1, 100)], 90) is None
    assert "detection_boxes [B, N, 4]" in check([(1,), (1, 100, 5), (1, 100), (1, 100)], 90)
    assert "100 detection_boxes but 50 detection_classes" in check([(1,), (1, 100, 4), (1, 100), (1, 50)], 90)
