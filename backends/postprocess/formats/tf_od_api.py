"""`tf_od_api`: the TensorFlow Object Detection API's four outputs (SSD, SSDLite, Faster R-CNN, EfficientDet
exports): num_detections [B] (or [B, 1]), detection_boxes [B, N, 4] as normalised ymin xmin ymax xmax,
detection_scores [B, N] and detection_classes [B, N] as float class ids starting at 1. Only the first
num_detections rows of an image count. Options: box_encoding, normalized, class_offset (defaults yxyx, true, 1)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import (Decoded, DecodeOptions, OutputFormat, Shape, class_ids_from, finish,
                                               rows, to_xyxy_pixels)

DEFAULTS = {"box_encoding": "yxyx", "normalized": True, "class_offset": 1}


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    count, boxes, scores, classes = shapes
    if len(count) not in (1, 2) or (len(count) == 2 and count[1] not in (-1, 1)):
        return f"format 'tf_od_api' needs num_detections [B] or [B, 1]; the model's is {list(count)}"
    if len(boxes) != 3 or boxes[-1] not in (-1, 4):
        return f"format 'tf_od_api' needs detection_boxes [B, N, 4]; the model's are {list(boxes)}"
    for role, shape in (("detection_scores", scores), ("detection_classes", classes)):
        if len(shape) != 2:
            return f"format 'tf_od_api' needs {role} [B, N]; the model's are {list(shape)}"
        if -1 not in (boxes[1], shape[1]) and boxes[1] != shape[1]:
            return f"format 'tf_od_api': {boxes[1]} detection_boxes but {shape[1]} {role}"
    return None


def decode_tf_od_api(count: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                     num_classes: int, *, score_threshold: Optional[float] = None,
                     options: DecodeOptions = DecodeOptions(class_offset=1)) -> Decoded:
    """One image's four tensors (or each with a batch of one) -> Decoded, of the first num_detections rows."""
    count = np.asarray(count).reshape(-1)
    if count.size != 1 or not np.isfinite(count[0]) or count[0] < 0:
        raise InvalidTensorError(f"tf_od_api num_detections: expected one non-negative count per image, got {count!r}")
    boxes = rows(boxes, "tf_od_api detection_boxes", 4)
    scores = rows(scores, "tf_od_api detection_scores")
    classes = rows(classes, "tf_od_api detection_classes")
    if not len(boxes) == len(scores) == len(classes):
        raise InvalidTensorError(f"tf_od_api: {len(boxes)} detection_boxes, {len(scores)} detection_scores and "
                                 f"{len(classes)} detection_classes; expected as many of each")
    n = int(count[0])
    if n > len(boxes):
        raise InvalidTensorError(f"tf_od_api: num_detections {n} is over the {len(boxes)} rows of detection_boxes")
    boxes, scores, classes = boxes[:n], scores[:n].astype(np.float32), classes[:n]
    if score_threshold is not None:
        keep = scores > score_threshold
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    class_ids = class_ids_from(classes, options, num_classes, "tf_od_api detection_classes")
    return finish(to_xyxy_pixels(boxes, options), scores, class_ids)


FORMAT = OutputFormat(
    name="tf_od_api",
    summary="TF Object Detection API: num_detections [B], detection_boxes [B, N, 4] normalised y1 x1 y2 x2, "
            "detection_scores [B, N], detection_classes [B, N] from 1",
    outputs=("num_detections", "boxes", "scores", "classes"),
    check_shapes=check_shapes,
    decode=lambda tensors, num_classes, *, score_threshold=None, options=None: decode_tf_od_api(
        *tensors, num_classes, score_threshold=score_threshold,
        options=options or DecodeOptions(class_offset=1)),
    options=("box_encoding", "normalized", "class_offset"),
    defaults=DEFAULTS,
)
