"""Output formats: one registry entry per way a detector's raw output encodes its detections.

An OutputFormat names the format's output tensors, checks their shapes at build time (check_shapes) and decodes
one image's tensors at run time (decode). The spec validates `model.output.format` against FORMATS, the builder
checks the model with the entry, postprocess decodes with it. Adding a format is one module in this package
(defining FORMAT) and its tests; list it in _MODULES.
"""
from __future__ import annotations

import importlib

from backends.postprocess.formats.base import BOX_ENCODINGS, OPTION_FIELDS, Decoded, DecodeOptions, OutputFormat, Shape

_MODULES = ("detections", "yolov8", "boxes_scores", "yolov5", "tf_od_api", "torchvision", "rtdetr", "yolox")

FORMATS: dict[str, OutputFormat] = {}


def register(fmt: OutputFormat) -> OutputFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"output format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> OutputFormat:
    """The registered format, or KeyError naming the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown output format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


for _module in _MODULES:
    register(importlib.import_module(f"{__name__}.{_module}").FORMAT)

__all__ = ["BOX_ENCODINGS", "OPTION_FIELDS", "Decoded", "DecodeOptions", "FORMATS", "OutputFormat", "Shape", "get_format", "register"]
