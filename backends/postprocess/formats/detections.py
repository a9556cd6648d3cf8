"""`detections`: already-decoded detections [B, K, 6] (x1, y1, x2, y2, score, class index), e.g. models exported
with their NMS-free decode in the graph (the fixture CenterNet)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import Decoded, OutputFormat, Shape, one_tensor, squeeze_batch


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    (shape,) = shapes
    if len(shape) != 3 or shape[-1] not in (-1, 6):
        return f"format 'detections' needs an output [B, K, 6]; the model's is {list(shape)}"
    return None


def decode_detections(raw: np.ndarray, num_classes: Optional[int] = None, *,
                      score_threshold: Optional[float] = None) -> Decoded:
    """[K, 6] or [1, K, 6]. Corners are reordered (min/max) where x2 < x1 or y2 < y1. With num_classes, a kept
    class index outside [0, num_classes) is an InvalidTensorError."""
    raw = squeeze_batch(raw, "detections")
    if raw.shape[1] != 6:
        raise InvalidTensorError(f"detections: expected [K, 6] (x1, y1, x2, y2, score, class), got shape {raw.shape}")
    if score_threshold is not None:
        raw = raw[raw[:, 4] > score_threshold]
    raw = raw.astype(np.float32, copy=False)
    finite = np.isfinite(raw).all(axis=1)
    if not finite.all():
        raw = raw[finite]
    lo, hi = raw[:, 0:2], raw[:, 2:4]
    boxes = np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)], axis=1)
    scores = np.ascontiguousarray(raw[:, 4])
    classes = np.rint(raw[:, 5])
    upper = np.iinfo(np.int32).max if num_classes is None else num_classes - 1
    lower = np.iinfo(np.int32).min if num_classes is None else 0
    if classes.size and (classes.min() < lower or classes.max() > upper):
        raise InvalidTensorError(f"detections: class index out of range [{lower}, {upper}]: "
                                 f"min {classes.min():g}, max {classes.max():g}")
    return boxes, scores, classes.astype(np.int32)


FORMAT = OutputFormat(
    name="detections",
    summary="[B, K, 6]: x1 y1 x2 y2 score class, in model-input pixels",
    outputs=("detections",),
    check_shapes=check_shapes,
    decode=one_tensor(decode_detections),
)
