"""Per-image detections and their padded batch form (the tensors postprocess and router exchange)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # float32 [K, 4] x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray  # float32 [K], descending
    class_ids: np.ndarray  # int32 [K]
    class_names: tuple[str, ...] | None = None  # when None, names come from the pipeline's class list

    @property
    def best_score(self) -> float:
        return float(self.scores.max()) if len(self.scores) else 0.0

    def __len__(self) -> int:
        return len(self.scores)


def pack(per_image: Sequence[Detections], class_names: Sequence[str]) -> tuple[np.ndarray, ...]:
    """(boxes [B,K,4], scores [B,K], class_ids [B,K], class_names [B,K] bytes, counts [B,1]) padded to the
    largest K of the batch; padding has score 0, class -1 and an empty name."""
    batch = len(per_image)
    width = max((len(d) for d in per_image), default=0)
    boxes = np.zeros((batch, width, 4), dtype=np.float32)
    scores = np.zeros((batch, width), dtype=np.float32)
    class_ids = np.full((batch, width), -1, dtype=np.int32)
    names = np.full((batch, width), b"", dtype=object)
    counts = np.zeros((batch, 1), dtype=np.int32)
    encoded = [n.encode() for n in class_names]
    for i, det in enumerate(per_image):
        k = len(det)
        boxes[i, :k] = det.boxes
        scores[i, :k] = det.scores
        class_ids[i, :k] = det.class_ids
        if det.class_names is not None:
            names[i, :k] = [n.encode() for n in det.class_names]
        else:
            names[i, :k] = [encoded[c] if 0 <= c < len(encoded) else str(c).encode() for c in det.class_ids.tolist()]
        counts[i, 0] = k
    return boxes, scores, class_ids, names, counts


def unpack(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, names: np.ndarray, counts: np.ndarray) -> list[Detections]:
    """Inverse of pack, dropping the padding."""
    out = []
    for i, k in enumerate(np.asarray(counts).reshape(-1).tolist()):
        out.append(
            Detections(
                boxes[i, :k].astype(np.float32).reshape(-1, 4),
                scores[i, :k].astype(np.float32),
                class_ids[i, :k].astype(np.int32),
                tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names[i, :k].tolist()),
            )
        )
    return out
