"""One image's raw detector output -> final detections on original-image pixels."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from backends.common.geometry import Transform, map_boxes_to_original
from backends.errors import InvalidTensorError
from backends.postprocess.formats import DecodeOptions, get_format
from backends.postprocess.nms import batched_nms

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


def _empty() -> Detections:
    return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)


def postprocess_image(
    raw: Union[np.ndarray, Sequence[np.ndarray]],
    output_format: str,
    transform: Union[Transform, np.ndarray],
    *,
    num_classes: int,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    class_agnostic: bool = False,
    options: Optional[DecodeOptions] = None,
) -> Detections:
    """Decode, keep score > score_threshold, NMS, map to original pixels, keep the best max_detections.

    raw is the detector's output tensor, or one per output of the format (formats.OutputFormat.outputs).
    options: how the format's tensors encode boxes and classes (the spec's; None: the format's defaults).
    transform is a Transform (or its float32[6] array form). Boxes that are empty after mapping and
    clipping to the image are dropped before the max_detections cut. Returns boxes float32 [K, 4]
    (x1, y1, x2, y2), scores float32 [K], class_ids int32 [K], in descending score order.
    """
    try:
        fmt = get_format(output_format)
    except KeyError as exc:
        raise InvalidTensorError(str(exc.args[0])) from None
    if max_detections < 0:
        raise ValueError(f"max_detections must be >= 0, got {max_detections}")
    if not isinstance(transform, Transform):
        transform = Transform.from_array(transform)

    tensors = [raw] if isinstance(raw, np.ndarray) else list(raw)
    if len(tensors) != len(fmt.outputs):
        raise InvalidTensorError(f"format {fmt.name!r} reads {len(fmt.outputs)} output tensor(s) "
                                 f"({', '.join(fmt.outputs)}), got {len(tensors)}")
    boxes, scores, class_ids = fmt.decode(tensors, num_classes, score_threshold=score_threshold, options=options)
    if scores.size == 0 or max_detections == 0:
        return _empty()

    keep = batched_nms(boxes, scores, class_ids, iou_threshold, class_agnostic=class_agnostic)
    boxes = map_boxes_to_original(boxes[keep], transform)
    scores, class_ids = scores[keep], class_ids[keep]

    non_empty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = np.flatnonzero(non_empty)[:max_detections]
    if keep.size == 0:
        return _empty()
    return (
        np.ascontiguousarray(boxes[keep], dtype=np.float32),
        np.ascontiguousarray(scores[keep], dtype=np.float32),
        np.ascontiguousarray(class_ids[keep], dtype=np.int32),
    )
