"""backends.postprocess.formats.yolox: raw grid outputs decoded with the strides' grids, on a graph built with
onnx.helper (tests/any_detector_models.py, one detection at stride 16) and on hand-made tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.formats.yolox import decode_yolox, grid
from builder.errors import SpecError
from builder.spec import load_spec
from tests import any_detector_models as models


@pytest.mark.parametrize("white", [True, False])
def test_the_graph_decodes_to_the_scene(tmp_path, white):
    found = models.detect_in_process(models.write_spec(tmp_path, "yolox"), white)
    models.assert_detections(found, 128, 96, white)


def test_the_grid_is_row_major_per_stride_in_order():
    cells, strides = grid(16, 32, (8, 16))
    assert len(cells) == 2 * 4 + 1 * 2
    assert cells[:5].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]] and cells[8:].tolist() == [[0, 0], [1, 0]]
    assert strides[:, 0].tolist() == [8] * 8 + [16] * 2


def test_a_cell_decodes_to_pixels():
    raw = np.zeros((10, 7), np.float32)
    raw[9] = [0.5, 0.25, math.log(2.0), 0.0, 0.9, 0.1, 0.8]  # stride 16, cell (1, 0)
    options = DecodeOptions(strides=(8, 16), input_height=16, input_width=32)
    boxes, scores, class_ids = decode_yolox(raw, 2, score_threshold=0.3, options=options)
    np.testing.assert_allclose(boxes, [[24 - 16, 4 - 8, 24 + 16, 4 + 8]])
    assert scores.tolist() == pytest.approx([0.72]) and class_ids.tolist() == [1]


def test_a_grid_that_does_not_match_the_candidates_is_named():
    with pytest.raises(InvalidTensorError, match="11 candidates, but a 16x32 input with strides \\[8, 16\\] has 10"):
        decode_yolox(np.zeros((11, 7), np.float32), 2, options=DecodeOptions(strides=(8, 16), input_height=16,
                                                                              input_width=32))
    assert "[B, N, 85]" in get_format("yolox").check_shapes([(1, 8400, 84)], 80)


def test_strides_are_the_only_option_the_spec_may_set(tmp_path):
    with pytest.raises(SpecError, match=r"format 'yolox' takes no option\(s\) \['box_encoding'\]; it takes: strides"):
        load_spec(models.write_spec(tmp_path, "yolox", output={"format": "yolox", "name": "output",
                                                              "box_encoding": "xyxy"}))
