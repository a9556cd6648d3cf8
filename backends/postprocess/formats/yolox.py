"""`yolox`: YOLOX exported without its decode (decode_in_inference=False): [B, N, 5 + C] per grid cell of each
stride, in order (stride 8's cells row by row, then 16's, then 32's): x and y offsets in cells, log w and log h in
cells, objectness and C class scores (sigmoided). N = sum over strides of (H / s) x (W / s) of the model input.
Box: centre = (offset + cell) x stride, size = exp(log size) x stride. Option: strides (default 8, 16, 32)."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np

from backends.errors import InvalidTensorError
from backends.postprocess.formats.base import Decoded, DecodeOptions, OutputFormat, finish, one_tensor, rows_of_classes_plus, rows

DEFAULT_STRIDES = (8, 16, 32)


check_shapes = rows_of_classes_plus("yolox", 5)


@lru_cache(maxsize=8)
def grid(height: int, width: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's cell (x, y) [N, 2] and stride [N, 1], in the head's order."""
    cells, cell_strides = [], []
    for stride in strides:
        ys, xs = np.meshgrid(np.arange(height // stride), np.arange(width // stride), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        cell_strides.append(np.full((xs.size, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(cell_strides).astype(np.float32)


def decode_yolox(raw: np.ndarray, num_classes: int, *, score_threshold: Optional[float] = None,
                 options: DecodeOptions = DecodeOptions(strides=DEFAULT_STRIDES)) -> Decoded:
    """[N, 5 + C] or [1, N, 5 + C] raw grid outputs -> Decoded; score = objectness x the best class score."""
    if num_classes is None or int(num_classes) < 1:
        raise InvalidTensorError(f"yolox: num_classes must be a positive integer, got {num_classes!r}")
    if not (options.input_height and options.input_width):
        raise InvalidTensorError("yolox: the model input's size is needed to lay out the grid")
    strides = options.strides or DEFAULT_STRIDES
    raw = rows(raw, "yolox", 5 + int(num_classes)).astype(np.float32, copy=False)
    cells, cell_strides = grid(options.input_height, options.input_width, tuple(strides))
    if len(raw) != len(cells):
        raise InvalidTensorError(
            f"yolox: {len(raw)} candidates, but a {options.input_height}x{options.input_width} input with strides "
            f"{list(strides)} has {len(cells)} grid cells")
    keep = np.ones(len(raw), bool) if score_threshold is None else raw[:, 4] > score_threshold
    raw, cells, cell_strides = raw[keep], cells[keep], cell_strides[keep]
    centre = (raw[:, :2] + cells) * cell_strides
    with np.errstate(over="ignore"):
        half = np.exp(raw[:, 2:4]) * cell_strides * 0.5
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    best = raw[:, 5:].argmax(axis=1) if len(raw) else np.zeros(0, np.int64)
    scores = raw[:, 4] * raw[np.arange(len(raw)), 5 + best]
    if score_threshold is not None:
        keep = scores > score_threshold
        boxes, scores, best = boxes[keep], scores[keep], best[keep]
    return finish(boxes, scores, best)


FORMAT = OutputFormat(
    name="yolox",
    summary="YOLOX raw grid outputs [B, N, 5 + C]: x y offsets, log w h in cells, objectness, C class scores",
    outputs=("predictions",),
    check_shapes=check_shapes,
    decode=one_tensor(decode_yolox, takes_options=True),
    options=("strides",),
    defaults={"strides": DEFAULT_STRIDES},
)
