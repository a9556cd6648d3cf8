"""One request's images -> model inputs, each image on its own: a bad image fails only itself.

Per image a status string: "" when it was prepared, else "image <index>: <what is wrong>". A bad image's slot in
the batch holds a blank model input, so the detector and postprocess run on a well-formed batch; the router gives
it no detections and never sends it to the cloud. A request whose every image is bad fails as a whole.
Plain functions (no Triton imports).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from backends.common.geometry import Transform
from backends.common.settings import DecodeLimits, InputSpec
from backends.errors import BusyError, InvalidImageError
from backends.preprocess.image_ops import Decoded, PixelBudget, decode_reduced, prepare_input

Prepare = Callable[[Decoded], tuple[Any, Transform]]


@dataclass
class PreparedBatch:
    tensors: list  # one model input per image (NumPy, or CuPy on a GPU instance)
    transforms: np.ndarray  # float32 [B, 6]
    statuses: list[str]  # "" or "image <i>: <error>"

    @property
    def status_array(self) -> np.ndarray:
        """BYTES [B, 1], the STATUS tensor."""
        return np.array([[s.encode()] for s in self.statuses], dtype=object).reshape(-1, 1)


def draft_side(spec: InputSpec) -> int:
    """The smallest side a JPEG may be decoded at so that resizing to the model input never upsamples."""
    return max(spec.height, spec.width)


def cpu_prepare(spec: InputSpec) -> Prepare:
    return lambda decoded: prepare_input(decoded.rgb, spec, decoded.original_size)


def blank_input(prepare: Prepare, spec: InputSpec) -> tuple[Any, Transform]:
    """The stand-in for a bad image: a black picture of the model's input size."""
    return prepare(Decoded(np.zeros((spec.height, spec.width, 3), dtype=np.uint8), spec.height, spec.width))


def prepare_batch(images: Sequence[Any], prepare: Prepare, spec: InputSpec, limits: DecodeLimits,
                  min_side: int | None, large_gate: Callable[[int], ContextManager] | None = None) -> PreparedBatch:
    """Decode and prepare each image of one request (JPEGs at reduced size when min_side is given), under the
    request's pixel budget, large images through large_gate (large_images.py). When no image is usable, raises
    BusyError if every image was refused as busy, else InvalidImageError, naming each image's problem."""
    budget = PixelBudget(limits.max_request_pixels)
    tensors, transforms, statuses = [], [], []
    blank, busy = None, 0
    for index, encoded in enumerate(images):
        try:
            if not isinstance(encoded, (bytes, np.bytes_)):
                raise InvalidImageError(f"expected encoded bytes, got {type(encoded).__name__}")
            tensor, transform = prepare(decode_reduced(bytes(encoded), limits, min_side, budget, large_gate))
            status = ""
        except (InvalidImageError, BusyError) as exc:
            busy += isinstance(exc, BusyError)
            blank = blank or blank_input(prepare, spec)
            (tensor, transform), status = blank, f"image {index}: {exc}"
        tensors.append(tensor)
        transforms.append(transform.to_array())
        statuses.append(status)
    if statuses and all(statuses):
        raise (BusyError if busy == len(statuses) else InvalidImageError)("; ".join(statuses))
    return PreparedBatch(tensors, np.stack(transforms) if transforms else np.zeros((0, 6), np.float32), statuses)
