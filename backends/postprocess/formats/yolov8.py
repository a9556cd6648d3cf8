"""`yolov8`: the raw Ultralytics YOLOv8 head [B, 4 + C, N] (cx, cy, w, h, then C class scores), or its transpose
[B, N, 4 + C] as some exporters write it."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import Decoded, OutputFormat, Shape, finish, one_tensor, squeeze_batch


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    (shape,) = shapes
    channels = 4 + num_classes
    if len(shape) != 3:
        return f"format 'yolov8' needs an output [B, 4 + C, N] or [B, N, 4 + C]; the model's is {list(shape)}"
    if -1 in shape[1:] or channels in shape[1:]:
        return None
    return (f"yolov8 output {list(shape)} has no dimension of 4 + C = {channels} for the spec's {num_classes} "
            "classes")


def _channels_first(raw: np.ndarray, channels: int) -> np.ndarray:
    """The [4 + C, N] view of a [4 + C, N] or transposed [N, 4 + C] tensor."""
    rows, cols = raw.shape
    if rows == channels:  # canonical Ultralytics layout; also the choice when N == 4 + C
        return raw
    if cols == channels:
        return raw.T
    raise InvalidTensorError(
        f"yolov8: expected [4 + num_classes, N] = [{channels}, N] (or [N, {channels}]), got shape {raw.shape}; "
        f"channel count must equal 4 + num_classes")


def _first_argmax(class_scores: np.ndarray, best: np.ndarray) -> np.ndarray:
    """class_scores.argmax(axis=0) given its max; much faster than argmax along a strided axis."""
    ids = np.zeros(best.shape, dtype=np.int32)
    for c in range(class_scores.shape[0] - 1, -1, -1):
        ids[class_scores[c] == best] = c
    return ids


def decode_yolov8(raw: np.ndarray, num_classes: int, *, score_threshold: Optional[float] = None) -> Decoded:
    """score = max class score, class = its argmax; boxes converted to x1y1x2y2."""
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"yolov8: num_classes must be a positive integer, got {num_classes!r}")
    raw = _channels_first(squeeze_batch(raw, "yolov8"), 4 + int(num_classes))
    raw = np.ascontiguousarray(raw, dtype=np.float32)  # no-op for the usual float32 [4 + C, N]
    class_scores = raw[4:]
    scores = class_scores.max(axis=0)
    keep = None if score_threshold is None else np.flatnonzero(scores > score_threshold)
    if keep is not None and keep.size * 8 < scores.size:  # few survivors: argmax only their columns
        class_ids = class_scores[:, keep].argmax(axis=0)
    else:
        class_ids = _first_argmax(class_scores, scores)
        class_ids = class_ids if keep is None else class_ids[keep]
    xywh = raw[:4] if keep is None else raw[:4, keep]
    scores = scores if keep is None else scores[keep]
    half_w, half_h = xywh[2] * 0.5, xywh[3] * 0.5
    boxes = np.stack([xywh[0] - half_w, xywh[1] - half_h, xywh[0] + half_w, xywh[1] + half_h], axis=1)
    return finish(boxes, scores, class_ids)


FORMAT = OutputFormat(
    name="yolov8",
    summary="[B, 4 + C, N] (or [B, N, 4 + C]): cx cy w h and C class scores per candidate",
    outputs=("predictions",),
    check_shapes=check_shapes,
    decode=one_tensor(decode_yolov8),
)
