"""`rtdetr`: DETR-family heads without NMS (RT-DETR, Deformable DETR, DINO): per-query class logits [B, Q, C]
and boxes [B, Q, 4] as normalised cx cy w h. score = sigmoid(logit) of each query's best class. Options:
box_encoding, normalized, class_offset, score_activation (none when the model already outputs probabilities)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import (Decoded, DecodeOptions, OutputFormat, Shape, finish, rows,
                                               to_xyxy_pixels)

DEFAULTS = {"box_encoding": "cxcywh", "normalized": True, "score_activation": "sigmoid"}


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    logits, boxes = shapes
    if len(logits) != 3 or logits[-1] not in (-1, num_classes):
        return (f"format 'rtdetr' needs logits [B, Q, C] with C = {num_classes} classes of the spec; the model's are "
                f"{list(logits)}")
    if len(boxes) != 3 or boxes[-1] not in (-1, 4):
        return f"format 'rtdetr' needs boxes [B, Q, 4]; the model's are {list(boxes)}"
    if -1 not in (logits[1], boxes[1]) and logits[1] != boxes[1]:
        return f"format 'rtdetr': {logits[1]} queries of logits but {boxes[1]} boxes"
    return None


def decode_rtdetr(logits: np.ndarray, boxes: np.ndarray, num_classes: int, *, score_threshold: Optional[float] = None,
                  options: DecodeOptions = DecodeOptions()) -> Decoded:
    """One image's logits [Q, C] and boxes [Q, 4] (or each with a batch of one) -> Decoded."""
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"rtdetr: num_classes must be a positive integer, got {num_classes!r}")
    logits = rows(logits, "rtdetr logits", int(num_classes) + options.class_offset).astype(np.float32, copy=False)
    boxes = rows(boxes, "rtdetr boxes", 4)
    if len(logits) != len(boxes):
        raise InvalidTensorError(f"rtdetr: {len(logits)} queries of logits but {len(boxes)} boxes")
    logits = logits[:, options.class_offset:]
    best = logits.argmax(axis=1) if len(logits) else np.zeros(0, np.int64)
    scores = logits[np.arange(len(logits)), best]
    if options.score_activation == "sigmoid":
        with np.errstate(over="ignore"):
            scores = 1.0 / (1.0 + np.exp(-scores))
    if score_threshold is not None:
        keep = scores > score_threshold
        boxes, scores, best = boxes[keep], scores[keep], best[keep]
    return finish(to_xyxy_pixels(boxes, options), scores, best)


FORMAT = OutputFormat(
    name="rtdetr",
    summary="RT-DETR / DETR queries: logits [B, Q, C] + boxes [B, Q, 4] normalised cx cy w h",
    outputs=("logits", "boxes"),
    check_shapes=check_shapes,
    decode=lambda tensors, num_classes, *, score_threshold=None, options=None: decode_rtdetr(
        *tensors, num_classes, score_threshold=score_threshold, options=options or DecodeOptions(**DEFAULTS)),
    options=("box_encoding", "normalized", "class_offset", "score_activation"),
    defaults=DEFAULTS,
)
