"""`boxes_scores`: two outputs, boxes [B, N, 4] (x1, y1, x2, y2 in model-input pixels) and per-class scores
[B, N, C], as many SSD / RetinaNet exports give them once their anchors are decoded. No background column: score
column c is class c of the spec. Each candidate keeps its best class. Options: box_encoding, normalized (boxes in
another encoding, or in [0, 1] of the model input)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import (Decoded, DecodeOptions, OutputFormat, Shape, finish, squeeze_batch,
                                               to_xyxy_pixels)


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    boxes, scores = shapes
    if len(boxes) != 3 or boxes[-1] not in (-1, 4):
        return f"format 'boxes_scores' needs boxes [B, N, 4]; the model's are {list(boxes)}"
    if len(scores) != 3 or scores[-1] not in (-1, num_classes):
        return (f"format 'boxes_scores' needs scores [B, N, C] with C = {num_classes} classes of the spec; "
                f"the model's are {list(scores)}")
    if -1 not in (boxes[1], scores[1]) and boxes[1] != scores[1]:
        return f"format 'boxes_scores': {boxes[1]} boxes but {scores[1]} rows of scores"
    return None


def decode_boxes_scores(boxes: np.ndarray, scores: np.ndarray, num_classes: int, *,
                        score_threshold: Optional[float] = None, options: Optional[DecodeOptions] = None) -> Decoded:
    """[N, 4] + [N, C] (or each with a batch of one): score = the best class score, class = its index."""
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"boxes_scores: num_classes must be a positive integer, got {num_classes!r}")
    boxes = squeeze_batch(boxes, "boxes_scores boxes")
    scores = squeeze_batch(scores, "boxes_scores scores")
    if boxes.shape[1] != 4:
        raise InvalidTensorError(f"boxes_scores: expected boxes [N, 4] (x1, y1, x2, y2), got shape {boxes.shape}")
    if scores.shape != (len(boxes), int(num_classes)):
        raise InvalidTensorError(f"boxes_scores: expected scores [{len(boxes)}, {int(num_classes)}] (one row per box, "
                                 f"one column per class), got shape {scores.shape}")
    best = scores.max(axis=1) if len(scores) else np.zeros(0, scores.dtype)
    class_ids = scores.argmax(axis=1) if len(scores) else np.zeros(0, np.int32)
    if score_threshold is not None:
        keep = best > score_threshold
        boxes, best, class_ids = boxes[keep], best[keep], class_ids[keep]
    if options is not None:
        boxes = to_xyxy_pixels(boxes, options)
    return finish(boxes, best, class_ids)


FORMAT = OutputFormat(
    name="boxes_scores",
    summary="boxes [B, N, 4] x1 y1 x2 y2 in model-input pixels + scores [B, N, C], one column per class",
    outputs=("boxes", "scores"),
    check_shapes=check_shapes,
    decode=lambda tensors, num_classes, *, score_threshold=None, options=None: decode_boxes_scores(
        tensors[0], tensors[1], num_classes, score_threshold=score_threshold, options=options),
    options=("box_encoding", "normalized"),
)
