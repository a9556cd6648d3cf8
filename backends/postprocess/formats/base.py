"""What an output format is, and the tensor helpers the formats share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError

# boxes float32 [K, 4] x1 y1 x2 y2 in model-input pixels, scores float32 [K], class_ids int32 [K]
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]
Shape = tuple[int, ...]  # a tensor shape as the model declares it; -1 for a dynamic dimension


@dataclass(frozen=True)
class OutputFormat:
    """name: the spec's model.output.format; summary: one line for help and errors.
    outputs: the roles of the detector output tensors the format reads, in order.
    check_shapes(shapes, num_classes): None when the declared shapes ([B, ...] per output) fit, else why not.
    decode(tensors, num_classes, score_threshold): one image's tensors (batch dimension removed or of size 1)
        -> Decoded; keeps score > score_threshold when it is given; InvalidTensorError on a wrong tensor."""

    name: str
    summary: str
    outputs: tuple[str, ...]
    check_shapes: Callable[[Sequence[Shape], int], Optional[str]]
    decode: Callable[..., Decoded]


def one_tensor(decoder: Callable[..., Decoded]) -> Callable[..., Decoded]:
    """OutputFormat.decode for a one-output format from decoder(raw, num_classes, *, score_threshold)."""
    def decode(tensors: Sequence[np.ndarray], num_classes: int, *, score_threshold: Optional[float] = None) -> Decoded:
        return decoder(tensors[0], num_classes, score_threshold=score_threshold)

    return decode


def squeeze_batch(raw: np.ndarray, name: str) -> np.ndarray:
    """Accept [A, B] or [1, A, B]; anything else is an InvalidTensorError."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise InvalidTensorError(f"{name}: expected a 2-D tensor (or a batch of one), got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise InvalidTensorError(f"{name}: expected a numeric tensor, got dtype {raw.dtype}")
    return raw


def finish(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> Decoded:
    """Drop candidates with a non-finite box or score; contiguous float32 / int32 arrays."""
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        boxes, scores, class_ids = boxes[finite], scores[finite], class_ids[finite]
    return (
        np.ascontiguousarray(boxes, dtype=np.float32),
        np.ascontiguousarray(scores, dtype=np.float32),
        np.ascontiguousarray(class_ids, dtype=np.int32),
    )
