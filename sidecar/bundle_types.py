"""What a verified bundle is: the contract between bundle verification and the update agent."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sidecar.errors import BundleError


# how far the gate lets a reproduced score move; detections this close to the score threshold may come or go
SCORE_TOLERANCE = 0.05


@dataclass(frozen=True)
class ExpectedOutput:
    """A sample input (encoded image bytes, base64 in JSON) and the detections the model must reproduce."""

    image_b64: str
    boxes: list[list[float]]
    scores: list[float]
    class_ids: list[int]
    name: str = ""  # the image's file name, for the gate's messages


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signed metadata was trusted and whose every file matched its size and sha256.

    files maps the path inside the model version folder (e.g. "model.onnx", "model.py",
    "backends/...") to the verified file in the staging area.
    """

    model_name: str  # the Triton model this version is for, e.g. "detect_detector"
    version: str  # semantic version, e.g. "1.4.0"
    target: str  # cpu | intel | nvidia-gpu | jetson
    metadata_version: int  # the signed metadata's version number
    files: dict[str, Path]
    file_hashes: dict[str, str]
    config_pbtxt: str | None = None  # the model's config.pbtxt, when the bundle carries one
    build_manifest: dict[str, Any] = field(default_factory=dict)
    expected_outputs: tuple[ExpectedOutput, ...] = ()
    base_version: str | None = None  # a delta bundle's base (semantic version)
    delivery: dict[str, str] = field(default_factory=dict)  # path -> "full", "unchanged" or the delta method
    device_classes: dict[str, Any] = field(default_factory=dict)  # builder.device_class.ArtifactClasses.to_dict()


def _number_list(value: Any, what: str) -> list:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BundleError(f"expected_outputs: {what} must be a list of numbers")
    return value


def parse_expected_output(item: Any) -> ExpectedOutput:
    """One signed expected_outputs entry, checked (BundleError naming what is wrong)."""
    if not isinstance(item, Mapping) or not isinstance(item.get("image_b64"), str):
        raise BundleError("expected_outputs: each entry needs image_b64, boxes, scores, class_ids")
    try:
        base64.b64decode(item["image_b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"expected_outputs: image_b64 is not base64 ({exc})") from exc
    boxes = item.get("boxes")
    if not isinstance(boxes, list) or not all(len(_number_list(b, "each box")) == 4 for b in boxes):
        raise BundleError("expected_outputs: boxes must be a list of [x1, y1, x2, y2]")
    scores = _number_list(item.get("scores"), "scores")
    class_ids = item.get("class_ids")
    if not isinstance(class_ids, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in class_ids):
        raise BundleError("expected_outputs: class_ids must be a list of integers")
    if not len(boxes) == len(scores) == len(class_ids):
        raise BundleError("expected_outputs: boxes, scores and class_ids differ in length")
    if not isinstance(item.get("name", ""), str):
        raise BundleError("expected_outputs: name must be text")
    return ExpectedOutput(item["image_b64"], boxes, scores, class_ids, item.get("name", ""))
