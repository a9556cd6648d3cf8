"""Weighted Boxes Fusion of several detectors' answers for one image (ensemble_boxes 1.0.9), on original pixels."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from ensemble_boxes import weighted_boxes_fusion

from backends.common.detections import Detections
from backends.errors import InvalidTensorError

EMPTY = Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))


def member_prefixes(count: int) -> list[str]:
    """The tensor prefix of each fused model's inputs (<PREFIX>_EDGE_BOXES...), in order: A, B, C..."""
    return [chr(ord("A") + i) for i in range(count)]


def fuse(per_model: Sequence[Detections], weights: Sequence[float], image_h: int, image_w: int, iou: float,
         skip_score: float, max_detections: int) -> Detections:
    """One fused answer from each model's detections of one image (boxes x1, y1, x2, y2 in pixels of an image of
    image_h x image_w): boxes of one class overlapping by iou or more are averaged, weighted by score and model
    weight; scores are averaged over the models (a box only one of two models found keeps half its score with
    equal weights). Class names come from the pipeline's class list (class_names None)."""
    if len(per_model) != len(weights):
        raise InvalidTensorError(f"fusion got {len(per_model)} models' detections for {len(weights)} weights")
    if image_h <= 0 or image_w <= 0:
        raise InvalidTensorError(f"fusion needs the image size, got {image_w}x{image_h}")
    if not any(len(d) for d in per_model):
        return EMPTY
    scale = np.array([image_w, image_h, image_w, image_h], dtype=np.float32)
    boxes = [np.clip(d.boxes.reshape(-1, 4) / scale, 0.0, 1.0) for d in per_model]
    boxes, scores, labels = weighted_boxes_fusion(
        boxes, [d.scores for d in per_model], [d.class_ids for d in per_model], weights=list(weights),
        iou_thr=iou, skip_box_thr=skip_score)
    order = np.argsort(-scores, kind="stable")[:max_detections]
    return Detections((boxes[order] * scale).astype(np.float32).reshape(-1, 4), scores[order].astype(np.float32),
                      labels[order].astype(np.int32))
