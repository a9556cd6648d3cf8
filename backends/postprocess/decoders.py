"""Decoders: one image's raw model output -> (boxes float32 [K,4] x1y1x2y2, scores float32 [K], class_ids int32 [K]).

Boxes stay in model-input pixels. Every decoder has the call signature
fn(raw, num_classes, *, score_threshold=None); a threshold keeps only score > score_threshold.
Candidates with a non-finite box, score or class are dropped.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from backends.errors import InvalidTensorError

Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]


def _squeeze_batch(raw: np.ndarray, name: str) -> np.ndarray:
    """Accept [A, B] or [1, A, B]; anything else is an InvalidTensorError."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise InvalidTensorError(f"{name}: expected a 2-D tensor (or a batch of one), got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise InvalidTensorError(f"{name}: expected a numeric tensor, got dtype {raw.dtype}")
    return raw


def _finish(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> Decoded:
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        boxes, scores, class_ids = boxes[finite], scores[finite], class_ids[finite]
    return (
        np.ascontiguousarray(boxes, dtype=np.float32),
        np.ascontiguousarray(scores, dtype=np.float32),
        np.ascontiguousarray(class_ids, dtype=np.int32),
    )


def decode_detections(
    raw: np.ndarray, num_classes: Optional[int] = None, *, score_threshold: Optional[float] = None
) -> Decoded:
    """Already-decoded detections [K, 6] (x1, y1, x2, y2, score, class_index), or [1, K, 6].

    Corners are reordered (min/max) where x2 < x1 or y2 < y1. With num_classes, a kept class index
    outside [0, num_classes) is an InvalidTensorError.
    """
    raw = _squeeze_batch(raw, "detections")
    if raw.shape[1] != 6:
        raise InvalidTensorError(
            f"detections: expected [K, 6] (x1, y1, x2, y2, score, class), got shape {raw.shape}"
        )
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
        raise InvalidTensorError(
            f"detections: class index out of range [{lower}, {upper}]: "
            f"min {classes.min():g}, max {classes.max():g}"
        )
    return boxes, scores, classes.astype(np.int32)


def _yolov8_channels_first(raw: np.ndarray, channels: int) -> np.ndarray:
    """Return the [4 + C, N] view of a [4 + C, N] or transposed [N, 4 + C] tensor."""
    rows, cols = raw.shape
    if rows == channels:  # canonical Ultralytics layout; also the choice when N == 4 + C
        return raw
    if cols == channels:
        return raw.T
    raise InvalidTensorError(
        f"yolov8: expected [4 + num_classes, N] = [{channels}, N] (or [N, {channels}]), got shape {raw.shape}; "
        f"channel count must equal 4 + num_classes"
    )


def _first_argmax(class_scores: np.ndarray, best: np.ndarray) -> np.ndarray:
    """class_scores.argmax(axis=0) given its max; much faster than argmax along a strided axis."""
    ids = np.zeros(best.shape, dtype=np.int32)
    for c in range(class_scores.shape[0] - 1, -1, -1):
        ids[class_scores[c] == best] = c
    return ids


def decode_yolov8(raw: np.ndarray, num_classes: int, *, score_threshold: Optional[float] = None) -> Decoded:
    """Raw Ultralytics YOLOv8 head [4 + C, N] (cx, cy, w, h, C class scores), [1, 4 + C, N] or [N, 4 + C].

    score = max class score, class = its argmax; boxes converted to x1y1x2y2.
    """
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"yolov8: num_classes must be a positive integer, got {num_classes!r}")
    raw = _yolov8_channels_first(_squeeze_batch(raw, "yolov8"), 4 + int(num_classes))
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
    return _finish(boxes, scores, class_ids)


DECODERS: dict[str, Callable[..., Decoded]] = {
    "detections": decode_detections,
    "yolov8": decode_yolov8,
}
