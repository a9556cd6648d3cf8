"""Geometry shared by preprocess and postprocess: the affine map original image -> model input.

A point (x, y) of the original image lands at (x * scale_x + pad_x, y * scale_y + pad_y) in the
model input. Preprocess emits this map per image as a float32[6] tensor; postprocess inverts it to
put boxes back on original pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESIZE_MODES = ("stretch", "letterbox")
TRANSFORM_WIDTH = 6


@dataclass(frozen=True)
class Transform:
    orig_h: int
    orig_w: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    resized_w: int
    resized_h: int

    def to_array(self) -> np.ndarray:
        """float32[6]: orig_h, orig_w, scale_x, scale_y, pad_x, pad_y."""
        return np.array(
            [self.orig_h, self.orig_w, self.scale_x, self.scale_y, self.pad_x, self.pad_y],
            dtype=np.float32,
        )

    @classmethod
    def from_array(cls, row: np.ndarray) -> "Transform":
        orig_h, orig_w, scale_x, scale_y, pad_x, pad_y = (float(v) for v in np.asarray(row).reshape(-1)[:6])
        return cls(
            orig_h=int(round(orig_h)),
            orig_w=int(round(orig_w)),
            scale_x=scale_x,
            scale_y=scale_y,
            pad_x=pad_x,
            pad_y=pad_y,
            resized_w=int(round(orig_w * scale_x)),
            resized_h=int(round(orig_h * scale_y)),
        )


def compute_transform(orig_h: int, orig_w: int, in_h: int, in_w: int, mode: str) -> Transform:
    """The map for resizing an orig_h x orig_w image into an in_h x in_w model input.

    stretch: each axis scaled independently, no padding (aspect ratio not kept).
    letterbox: one scale for both axes, the resized image centred, the rest padded.
    """
    if orig_h <= 0 or orig_w <= 0 or in_h <= 0 or in_w <= 0:
        raise ValueError(f"sizes must be positive: image {orig_h}x{orig_w}, input {in_h}x{in_w}")
    if mode == "stretch":
        return Transform(orig_h, orig_w, in_w / orig_w, in_h / orig_h, 0.0, 0.0, in_w, in_h)
    if mode == "letterbox":
        scale = min(in_w / orig_w, in_h / orig_h)
        resized_w = min(in_w, max(1, int(round(orig_w * scale))))
        resized_h = min(in_h, max(1, int(round(orig_h * scale))))
        pad_x = (in_w - resized_w) // 2
        pad_y = (in_h - resized_h) // 2
        return Transform(
            orig_h, orig_w, resized_w / orig_w, resized_h / orig_h, float(pad_x), float(pad_y), resized_w, resized_h
        )
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")


def map_boxes_to_original(boxes: np.ndarray, transform: Transform) -> np.ndarray:
    """Model-input boxes [K, 4] (x1, y1, x2, y2) -> original-image pixels, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = np.empty_like(boxes)
    out[:, 0::2] = (boxes[:, 0::2] - transform.pad_x) / transform.scale_x
    out[:, 1::2] = (boxes[:, 1::2] - transform.pad_y) / transform.scale_y
    np.clip(out[:, 0::2], 0.0, float(transform.orig_w), out=out[:, 0::2])
    np.clip(out[:, 1::2], 0.0, float(transform.orig_h), out=out[:, 1::2])
    return out
