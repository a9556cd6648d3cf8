"""`yolov5`: the YOLOv5 / YOLOv7 head [B, N, 5 + C] (cx, cy, w, h, objectness, then C class scores), already
sigmoided and in model-input pixels as Ultralytics exports it. score = objectness x the best class score.
Options: box_encoding, normalized, class_offset."""
from __future__ import annotations

from typing import Optional

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import (Decoded, DecodeOptions, OutputFormat, finish, one_tensor, rows_of_classes_plus, rows,
                                               to_xyxy_pixels)


check_shapes = rows_of_classes_plus("yolov5", 5)


def decode_yolov5(raw: np.ndarray, num_classes: int, *, score_threshold: Optional[float] = None,
                  options: DecodeOptions = DecodeOptions(box_encoding="cxcywh")) -> Decoded:
    """[N, 5 + C] or [1, N, 5 + C] -> Decoded; the class is the best class column less class_offset."""
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"yolov5: num_classes must be a positive integer, got {num_classes!r}")
    raw = rows(raw, "yolov5", 5 + int(num_classes)).astype(np.float32, copy=False)
    if score_threshold is not None:  # score <= objectness: drop the bulk before the class argmax
        raw = raw[raw[:, 4] > score_threshold]
    class_scores = raw[:, 5:]
    best = class_scores.argmax(axis=1) if len(raw) else np.zeros(0, np.int64)
    scores = raw[:, 4] * class_scores[np.arange(len(raw)), best]
    boxes = to_xyxy_pixels(raw[:, :4], options)
    class_ids = best - options.class_offset
    keep = (class_ids >= 0) & (class_ids < num_classes)
    if score_threshold is not None:
        keep &= scores > score_threshold
    return finish(boxes[keep], scores[keep], class_ids[keep])


FORMAT = OutputFormat(
    name="yolov5",
    summary="[B, N, 5 + C]: cx cy w h objectness and C class scores per candidate (YOLOv5/v7)",
    outputs=("predictions",),
    check_shapes=check_shapes,
    decode=one_tensor(decode_yolov5, takes_options=True),
    options=("box_encoding", "normalized", "class_offset"),
    defaults={"box_encoding": "cxcywh"},
)
