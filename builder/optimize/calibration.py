"""Calibration images, read through the same preprocess function the server runs.

Everything is checked before any quantization work starts: an empty folder, unreadable images or fewer
images than asked for fail with CalibrationError and nothing is written.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from backends.common.files import image_folder
from backends.errors import InvalidImageError
from backends.preprocess.image_ops import DecodeLimits, InputSpec, decode_image, prepare_input
from builder.errors import BuilderError


class CalibrationError(BuilderError):
    """The calibration images cannot be used."""


@dataclass(frozen=True)
class CalibrationSet:
    """Model-input tensors [1, ...] for a fixed, sorted list of images, and a hash that identifies them."""

    paths: tuple[Path, ...]
    tensors: tuple[np.ndarray, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.tensors)

    def batches(self) -> Iterator[np.ndarray]:
        yield from self.tensors


def load_calibration_set(folder: Path, spec: InputSpec, limits: DecodeLimits, count: int | None = None) -> CalibrationSet:
    """The first `count` images of folder (sorted by name), preprocessed exactly as the server does."""
    paths = image_folder(Path(folder), CalibrationError, "calibration folder")
    if count is not None:
        if count < 1:
            raise CalibrationError(f"calibration needs at least one image, asked for {count}")
        if len(paths) < count:
            raise CalibrationError(f"calibration asked for {count} images but {folder} has only {len(paths)}")
        paths = paths[:count]
    digest = hashlib.sha256()
    tensors, unreadable = [], []
    for path in paths:
        data = path.read_bytes()
        try:
            tensor, _ = prepare_input(decode_image(data, limits), spec)
        except InvalidImageError as exc:
            unreadable.append(f"{path.name}: {exc}")
            continue
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
        tensors.append(np.ascontiguousarray(tensor[None]))
    if unreadable:
        raise CalibrationError(f"{len(unreadable)} calibration image(s) cannot be used: " + "; ".join(unreadable))
    return CalibrationSet(tuple(paths), tuple(tensors), digest.hexdigest())
