"""What a verified bundle is: the contract between bundle verification and the update agent."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
