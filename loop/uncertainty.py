"""How unsure the model is about one image: per-detection class probabilities, Shannon entropy and margin, and the
keep rule (entropy over a threshold, or the best score in an unsure band). Plain numpy, no Triton.

A detection's class scores come from the model's raw candidates (before the score threshold and NMS): every
candidate of any class whose box overlaps the detection at `same_object_iou` or more votes its score for its class
(the best per class wins). For a heatmap detector (CenterNet) these are the per-class peaks at the object's
centre; for an anchor or grid detector (YOLO-style, boxes + class scores) the class scores of the cells that see
the object. Normalised, they are the detection's class distribution p; entropy H(p) = -sum p log2 p in bits
(0: one class only; 1: two classes evenly), margin = p(best) - p(second best).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a [K, 4] with every box of b [M, 4] (x1, y1, x2, y2) -> [K, M]."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def class_scores(det_boxes: np.ndarray, det_scores: np.ndarray, det_classes: np.ndarray, cand_boxes: np.ndarray,
                 cand_scores: np.ndarray, cand_classes: np.ndarray, num_classes: int,
                 same_object_iou: float = 0.6) -> np.ndarray:
    """[K, num_classes]: for each detection, the best score of each class among the candidates on the same object
    (and the detection's own score for its class). Candidates of class ids outside [0, num_classes) are ignored."""
    k = len(det_scores)
    out = np.zeros((k, num_classes), np.float32)
    if k == 0:
        return out
    det_classes = np.asarray(det_classes, np.int64).reshape(-1)
    valid = (det_classes >= 0) & (det_classes < num_classes)
    out[np.flatnonzero(valid), det_classes[valid]] = np.asarray(det_scores, np.float32).reshape(-1)[valid]
    cand_classes = np.asarray(cand_classes, np.int64).reshape(-1)
    cand_scores = np.asarray(cand_scores, np.float32).reshape(-1)
    keep = (cand_classes >= 0) & (cand_classes < num_classes)
    if not keep.any():
        return out
    iou = pairwise_iou(det_boxes, np.asarray(cand_boxes, np.float32).reshape(-1, 4)[keep])
    same = iou >= same_object_iou  # [K, M]
    classes, scores = cand_classes[keep], cand_scores[keep]
    for i in range(k):
        hit = np.flatnonzero(same[i])
        if hit.size:
            np.maximum.at(out[i], classes[hit], scores[hit])
    return out


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of class scores [K, C] (>= 0) -> rows that sum to 1; an all-zero row stays zero."""
    scores = np.clip(np.asarray(scores, np.float64), 0.0, None)
    total = scores.sum(axis=1, keepdims=True)
    return np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of p [K, C]."""
    p = np.asarray(p, np.float64)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1)


def margin(p: np.ndarray) -> np.ndarray:
    """p(best class) - p(second best) of each row of p [K, C]; 1.0 where a row has one class only."""
    p = np.asarray(p, np.float64)
    if p.shape[1] < 2:
        return np.ones(len(p))
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


@dataclass(frozen=True)
class ImageUncertainty:
    """One image: per detection entropy (bits), margin, best score and best class; the image's keep reason."""
    entropy: tuple[float, ...]
    margin: tuple[float, ...]
    best_score: float | None  # None: no detection
    reason: str | None  # why the image is kept; None: not kept

    @property
    def keep(self) -> bool:
        return self.reason is not None

    @property
    def max_entropy(self) -> float:
        return max(self.entropy, default=0.0)

    def to_dict(self) -> dict:
        return {"entropy": [round(e, 4) for e in self.entropy], "margin": [round(m, 4) for m in self.margin],
                "best_score": self.best_score, "reason": self.reason}


def assess(det_scores: np.ndarray, scores_per_class: np.ndarray, *, entropy_threshold: float, unsure_low: float,
           unsure_high: float, class_names: tuple[str, ...] = ()) -> ImageUncertainty:
    """The keep rule on one image: kept when any detection's class entropy exceeds entropy_threshold (bits), or
    when the image's best detection score lies in [unsure_low, unsure_high)."""
    p = probabilities(scores_per_class)
    ent, mar = entropy_bits(p), margin(p)
    det_scores = np.asarray(det_scores, np.float32).reshape(-1)
    best = float(det_scores.max()) if det_scores.size else None
    reason = None
    if ent.size and float(ent.max()) > entropy_threshold:
        i = int(ent.argmax())
        top = np.argsort(-p[i])[:2]
        names = "/".join(class_names[c] if c < len(class_names) else str(c) for c in top)
        reason = f"entropy {ent[i]:.2f} bits > {entropy_threshold:g} ({names})"
    elif best is not None and unsure_low <= best < unsure_high:
        reason = f"best score {best:.2f} in unsure band [{unsure_low:g}, {unsure_high:g})"
    return ImageUncertainty(tuple(float(e) for e in ent), tuple(float(m) for m in mar), best, reason)
