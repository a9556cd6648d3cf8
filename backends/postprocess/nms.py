"""Greedy non-maximum suppression on x1y1x2y2 boxes (continuous coordinates, area = w * h, no +1)."""
from __future__ import annotations

import numpy as np


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    return boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices (int64) of the boxes kept by greedy NMS, in descending score order.

    A box is suppressed when its IoU with an already kept, higher-scoring box is > iou_threshold.
    Equal scores keep their input order.
    """
    boxes = _as_boxes(boxes)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.int64)

    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        if rest.size == 0:
            break
        inter_w = np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])
        inter_h = np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])
        inter = np.maximum(inter_w, 0.0) * np.maximum(inter_h, 0.0)
        union = areas[best] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    class_agnostic: bool = False,
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Uses the offset trick: each class is shifted to its own disjoint region, then one plain NMS.
    class_agnostic=True is plain nms over all boxes. Returns int64 indices, descending score.
    """
    boxes = _as_boxes(boxes)
    class_ids = np.asarray(class_ids).reshape(-1)
    if class_ids.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {class_ids.shape[0]} class ids")
    if class_agnostic or boxes.shape[0] == 0:
        return nms(boxes, scores, iou_threshold)
    # Dense class ranks keep the offsets small, so float64 shifting barely perturbs the IoUs.
    _, rank = np.unique(class_ids, return_inverse=True)
    span = float(boxes.max() - boxes.min()) + 1.0
    shifted = boxes + (rank.reshape(-1) * span)[:, None]
    return nms(shifted, scores, iou_threshold)
