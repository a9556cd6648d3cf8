"""Draw detections on the original picture (EXIF orientation applied, as the server saw it)."""
from __future__ import annotations

import colorsys
from pathlib import Path

import cv2
import numpy as np

from backends.preprocess.image_ops import DecodeLimits, decode_image
from edgestack.client import DetectionResult

_UNLIMITED = DecodeLimits(max_bytes=2**40, max_pixels=2**40, max_side=2**20, min_side=1)


def _color(class_id: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def annotate(image: bytes, result: DetectionResult) -> np.ndarray:
    """A BGR picture with a box, class name and score per detection."""
    canvas = cv2.cvtColor(decode_image(image, _UNLIMITED), cv2.COLOR_RGB2BGR)
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for det in result.detections:
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        color = _color(det.class_id)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        label = f"{det.class_name} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 4, top + th + base + 2), color, -1)
        cv2.putText(canvas, label, (x1 + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if result.source == "cloud" or result.degraded:
        tag = f"source={result.source}" + (" degraded" if result.degraded else "")
        cv2.putText(canvas, tag, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2, cv2.LINE_AA)
    return canvas


def write_annotated(image: bytes, result: DetectionResult, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), annotate(image, result)):
        raise OSError(f"could not write {path}")
    return path
