"""`torchvision`: torchvision detection models' (Faster R-CNN, RetinaNet, SSD, FCOS) outputs with a batch
dimension: boxes [B, N, 4] as x1 y1 x2 y2 in model-input pixels, labels [B, N] (integers; 0 is the background,
so class_offset defaults to 1) and scores [B, N], already thresholded and NMS'd by the model (postprocess applies
its own threshold and NMS again). Options: box_encoding, normalized, class_offset."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import (Decoded, DecodeOptions, OutputFormat, Shape, class_ids_from, finish,
                                               rows, to_xyxy_pixels)


def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
    boxes, labels, scores = shapes
    if len(boxes) != 3 or boxes[-1] not in (-1, 4):
        return f"format 'torchvision' needs boxes [B, N, 4]; the model's are {list(boxes)}"
    for role, shape in (("labels", labels), ("scores", scores)):
        if len(shape) != 2:
            return f"format 'torchvision' needs {role} [B, N]; the model's are {list(shape)}"
        if -1 not in (boxes[1], shape[1]) and boxes[1] != shape[1]:
            return f"format 'torchvision': {boxes[1]} boxes but {shape[1]} {role}"
    return None


def decode_torchvision(boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, num_classes: int, *,
                       score_threshold: Optional[float] = None,
                       options: DecodeOptions = DecodeOptions(class_offset=1)) -> Decoded:
    """One image's boxes [N, 4], labels [N], scores [N] (or each with a batch of one) -> Decoded."""
    boxes = rows(boxes, "torchvision boxes", 4)
    labels = rows(labels, "torchvision labels")
    scores = rows(scores, "torchvision scores").astype(np.float32)
    if not len(boxes) == len(labels) == len(scores):
        raise InvalidTensorError(f"torchvision: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores; "
                                 "expected as many of each")
    if score_threshold is not None:
        keep = scores > score_threshold
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    class_ids = class_ids_from(labels, options, num_classes, "torchvision labels")
    return finish(to_xyxy_pixels(boxes, options), scores, class_ids)


FORMAT = OutputFormat(
    name="torchvision",
    summary="torchvision detection outputs: boxes [B, N, 4] x1 y1 x2 y2 pixels, labels [B, N] from 1, scores [B, N]",
    outputs=("boxes", "labels", "scores"),
    check_shapes=check_shapes,
    decode=lambda tensors, num_classes, *, score_threshold=None, options=None: decode_torchvision(
        *tensors, num_classes, score_threshold=score_threshold, options=options or DecodeOptions(class_offset=1)),
    options=("box_encoding", "normalized", "class_offset"),
    defaults={"class_offset": 1},
)
