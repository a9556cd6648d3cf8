"""What an output format is, and the tensor helpers the formats share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from backends.errors import InvalidTensorError

# boxes float32 [K, 4] x1 y1 x2 y2 in model-input pixels, scores float32 [K], class_ids int32 [K]
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray]
Shape = tuple[int, ...]  # a tensor shape as the model declares it; -1 for a dynamic dimension

BOX_ENCODINGS = ("xyxy", "yxyx", "cxcywh")
SCORE_ACTIVATIONS = ("none", "sigmoid")


@dataclass(frozen=True)
class DecodeOptions:
    """How a format's tensors encode boxes and classes (the spec's model.output fields of the same names).

    box_encoding: xyxy (x1 y1 x2 y2) | yxyx (y1 x1 y2 x2, TF) | cxcywh (centre, size).
    normalized: boxes in [0, 1] of the model input (scaled by input_width / input_height) instead of pixels.
    class_offset: subtracted from the model's class ids (1 where id 0 is background, e.g. TF OD API).
    strides: the grid strides of raw grid outputs (yolox). score_activation: applied to raw class scores (rtdetr).
    input_height / input_width: the model input the boxes refer to (the spec's size)."""

    box_encoding: str = "xyxy"
    normalized: bool = False
    class_offset: int = 0
    strides: tuple[int, ...] = ()
    score_activation: str = "none"
    input_height: int = 0
    input_width: int = 0

    def __post_init__(self) -> None:
        if self.box_encoding not in BOX_ENCODINGS:
            raise ValueError(f"box_encoding must be one of {BOX_ENCODINGS}, got {self.box_encoding!r}")
        if not isinstance(self.normalized, bool):
            raise ValueError(f"normalized must be true or false, got {self.normalized!r}")
        if isinstance(self.class_offset, bool) or not isinstance(self.class_offset, int):
            raise ValueError(f"class_offset must be an integer, got {self.class_offset!r}")
        strides = tuple(self.strides) if isinstance(self.strides, (list, tuple)) else None
        if strides is None or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in strides):
            raise ValueError(f"strides must be a list of positive integers, got {self.strides!r}")
        object.__setattr__(self, "strides", strides)
        if self.score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(f"score_activation must be one of {SCORE_ACTIVATIONS}, got {self.score_activation!r}")
        for name in ("input_height", "input_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.normalized and not (self.input_height and self.input_width):
            raise ValueError("normalized boxes need input_height and input_width (the model input's size)")


# The DecodeOptions fields a spec may set (the rest come from the model input).
OPTION_FIELDS = ("box_encoding", "normalized", "class_offset", "strides", "score_activation")


@dataclass(frozen=True)
class OutputFormat:
    """name: the spec's model.output.format; summary: one line for help and errors.
    outputs: the roles of the detector output tensors the format reads, in order.
    check_shapes(shapes, num_classes): None when the declared shapes ([B, ...] per output) fit, else why not.
    decode(tensors, num_classes, score_threshold, options): one image's tensors (batch dimension removed or of
        size 1) -> Decoded; keeps score > score_threshold when it is given; InvalidTensorError on a wrong tensor.
    options: the OPTION_FIELDS a spec may set for this format; defaults: this format's own values of them (its
        layout's convention, e.g. TF's normalised yxyx boxes and class ids from 1), over DecodeOptions'."""

    name: str
    summary: str
    outputs: tuple[str, ...]
    check_shapes: Callable[[Sequence[Shape], int], Optional[str]]
    decode: Callable[..., Decoded]
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def decode_options(self, given: Mapping[str, Any], input_height: int = 0, input_width: int = 0) -> DecodeOptions:
        """The format's defaults with the given (spec) values over them; ValueError naming an option the format
        does not take or an invalid value."""
        unknown = sorted(k for k, v in given.items() if v is not None and k not in self.options)
        if unknown:
            takes = ", ".join(self.options) or "none"
            raise ValueError(f"format {self.name!r} takes no option(s) {unknown}; it takes: {takes}")
        values = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        return DecodeOptions(**values, input_height=input_height, input_width=input_width)


def rows_of_classes_plus(name: str, extra: int) -> Callable[[Sequence[Shape], int], Optional[str]]:
    """check_shapes of a format with one output [B, N, extra + C]: per candidate `extra` values, then C scores."""
    def check_shapes(shapes: Sequence[Shape], num_classes: int) -> Optional[str]:
        (shape,) = shapes
        if len(shape) != 3 or shape[-1] not in (-1, extra + num_classes):
            return (f"format {name!r} needs an output [B, N, {extra} + C] = [B, N, {extra + num_classes}] for the "
                    f"spec's {num_classes} classes; the model's is {list(shape)}")
        return None

    return check_shapes


def one_tensor(decoder: Callable[..., Decoded], takes_options: bool = False) -> Callable[..., Decoded]:
    """OutputFormat.decode for a one-output format from decoder(raw, num_classes, *, score_threshold[, options])."""
    def decode(tensors: Sequence[np.ndarray], num_classes: int, *, score_threshold: Optional[float] = None,
               options: Optional[DecodeOptions] = None) -> Decoded:
        if takes_options and options is not None:
            return decoder(tensors[0], num_classes, score_threshold=score_threshold, options=options)
        return decoder(tensors[0], num_classes, score_threshold=score_threshold)

    return decode


def to_xyxy_pixels(boxes: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """[N, 4] boxes in options' encoding -> float32 x1 y1 x2 y2 in model-input pixels."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidTensorError(f"boxes: expected [N, 4], got shape {boxes.shape}")
    if options.box_encoding == "yxyx":
        boxes = boxes[:, [1, 0, 3, 2]]
    elif options.box_encoding == "cxcywh":
        half_w, half_h = boxes[:, 2] * 0.5, boxes[:, 3] * 0.5
        boxes = np.stack([boxes[:, 0] - half_w, boxes[:, 1] - half_h, boxes[:, 0] + half_w, boxes[:, 1] + half_h], axis=1)
    if options.normalized:
        boxes = boxes * np.array([options.input_width, options.input_height] * 2, np.float32)
    return boxes


def class_ids_from(raw: np.ndarray, options: DecodeOptions, num_classes: int, name: str) -> np.ndarray:
    """The model's class ids (integer or float) less the class offset; InvalidTensorError naming the first id
    outside the spec's [0, num_classes) classes."""
    ids = np.rint(np.asarray(raw, dtype=np.float64)).astype(np.int64) - options.class_offset
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = ids[(ids < 0) | (ids >= num_classes)][0] + options.class_offset
        raise InvalidTensorError(f"{name}: class id {bad} is outside the spec's {num_classes} classes (ids "
                                 f"{options.class_offset}..{options.class_offset + num_classes - 1} with class_offset "
                                 f"{options.class_offset})")
    return ids.astype(np.int32)


def rows(raw: np.ndarray, name: str, width: Optional[int] = None) -> np.ndarray:
    """One image's [N, width] (or [N] when width is None) from it or a batch of one; InvalidTensorError else."""
    raw = np.asarray(raw)
    want = 1 if width is None else 2
    if raw.ndim == want + 1 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != want or (width is not None and raw.shape[1] != width):
        expected = "[N]" if width is None else f"[N, {width}]"
        raise InvalidTensorError(f"{name}: expected {expected} (or a batch of one), got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise InvalidTensorError(f"{name}: expected a numeric tensor, got dtype {raw.dtype}")
    return raw


def squeeze_batch(raw: np.ndarray, name: str) -> np.ndarray:
    """Accept [A, B] or [1, A, B]; anything else is an InvalidTensorError."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.ndim != 2:
        raise InvalidTensorError(f"{name}: expected a 2-D tensor (or a batch of one), got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise InvalidTensorError(f"{name}: expected a numeric tensor, got dtype {raw.dtype}")
    return raw


def finish(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray) -> Decoded:
    """Drop candidates with a non-finite box or score; contiguous float32 / int32 arrays."""
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        boxes, scores, class_ids = boxes[finite], scores[finite], class_ids[finite]
    return (
        np.ascontiguousarray(boxes, dtype=np.float32),
        np.ascontiguousarray(scores, dtype=np.float32),
        np.ascontiguousarray(class_ids, dtype=np.int32),
    )
