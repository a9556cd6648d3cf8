"""backends.postprocess.formats.torchvision: boxes, labels (from 1) and scores, on a graph built with onnx.helper
whose labels are int64 (tests/any_detector_models.py) and on hand-made tensors."""
from __future__ import annotations

import numpy as np
import pytest

from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.formats.torchvision import decode_torchvision
from tests import any_detector_models as models

BOXES = np.array([[10, 20, 30, 40], [0, 0, 5, 5]], np.float32)


@pytest.mark.parametrize("white", [True, False])
def test_the_graph_decodes_to_the_scene(tmp_path, white):
    found = models.detect_in_process(models.write_spec(tmp_path, "torchvision"), white)
    models.assert_detections(found, 128, 96, white)


def test_labels_from_one_by_default_and_the_offset_is_an_option():
    _, scores, class_ids = decode_torchvision(BOXES, np.array([1, 3], np.int64), np.array([0.9, 0.6], np.float32), 3)
    assert class_ids.tolist() == [0, 2] and scores.tolist() == pytest.approx([0.9, 0.6])
    _, _, class_ids = decode_torchvision(BOXES, np.array([0, 2]), np.array([0.9, 0.6], np.float32), 3,
                                         options=DecodeOptions(class_offset=0))
    assert class_ids.tolist() == [0, 2]


def test_wrong_tensors_are_named():
    with pytest.raises(InvalidTensorError, match="2 boxes, 1 labels and 2 scores"):
        decode_torchvision(BOXES, np.array([1]), np.array([0.9, 0.6], np.float32), 3)
    with pytest.raises(InvalidTensorError, match="torchvision labels: class id 0 is outside"):
        decode_torchvision(BOXES, np.array([0, 1]), np.array([0.9, 0.6], np.float32), 3)
    check = get_format("torchvision").check_shapes
    assert check([(-1, -1, 4), (-1, -1), (-1, -1)], 91) is None
    assert "labels [B, N]" in check([(1, 100, 4), (1, 100, 1, 1), (1, 100)], 91)
