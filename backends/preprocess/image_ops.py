"""Image preprocessing on the CPU: encoded bytes -> RGB pixels -> model input tensor.

Plain functions (no Triton imports); model.py maps InvalidImageError to a per-request error.
"""
from __future__ import annotations

import io
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backends.common.geometry import Transform, compute_transform
from backends.common.settings import DecodeLimits, InputSpec
from backends.errors import InvalidImageError, InvalidTensorError
from backends.preprocess.large_images import run_here

FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")  # no EPS/PDF/...: smaller attack surface
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# DecodeLimits.max_pixels is enforced on the header before any pixel is decoded, so Pillow's own
# process-wide bomb check is turned off: it would otherwise fire first with an unclear message.
Image.MAX_IMAGE_PIXELS = None
_EXIF_ORIENTATION = 0x0112
_OBJECT_AT_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")  # Pillow names its file object: <_io.BytesIO ...>


def _reason(exc: Exception) -> str:
    """Why Pillow refused the bytes, without the memory address of its file object."""
    if isinstance(exc, UnidentifiedImageError):
        return "the bytes are none of these formats"
    return _OBJECT_AT_ADDRESS.sub("the image", str(exc)) or type(exc).__name__


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if min(width, height) < limits.min_side:
        raise InvalidImageError(f"image {width}x{height} is smaller than the minimum side {limits.min_side}")
    if max(width, height) > limits.max_side:
        raise InvalidImageError(f"image {width}x{height} exceeds the maximum side {limits.max_side}")
    if width * height > limits.max_pixels:
        raise InvalidImageError(
            f"image {width}x{height} has {width * height} pixels, over the limit of {limits.max_pixels}"
        )


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded JPEG/PNG/BMP/GIF/TIFF/WebP -> HxWx3 uint8 RGB (C-contiguous, possibly read-only).

    The size limits are checked on the header before pixels are decoded, EXIF orientation is applied,
    alpha is dropped (transparent pixels keep their stored colour, as cv2.imread does) and 16-bit
    grayscale is scaled to 8 bit. Every failure raises InvalidImageError.
    """
    return decode_reduced(data, limits).rgb


@dataclass(frozen=True)
class Decoded:
    """Decoded pixels, possibly at a reduced size, and the size of the original image (after EXIF orientation)."""

    rgb: np.ndarray
    original_h: int
    original_w: int

    @property
    def original_size(self) -> tuple[int, int]:
        return self.original_h, self.original_w


class PixelBudget:
    """The pixels one request may still decode (DecodeLimits.max_request_pixels), spent image by image."""

    def __init__(self, pixels: int):
        self.left = pixels

    def spend(self, width: int, height: int) -> None:
        if width * height > self.left:
            raise InvalidImageError(f"decoding {width}x{height} pixels would exceed the request's pixel budget "
                                    f"({self.left} pixels left of DecodeLimits.max_request_pixels)")
        self.left -= width * height


def decode_reduced(data: bytes, limits: DecodeLimits = DecodeLimits(), min_side: int | None = None,
                   budget: PixelBudget | None = None, large_gate: Callable[[int], ContextManager] | None = None) -> Decoded:
    """decode_image, but a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8: Pillow's draft mode) that
    keeps both sides >= min_side (None: full size), the decoded pixels are charged to budget first, and the decode
    runs inside large_gate(pixels) (backends/preprocess/large_images.py), which may refuse it as busy or run it at
    low priority."""
    size = memoryview(data).nbytes
    if size == 0:
        raise InvalidImageError("empty image bytes")
    if size > limits.max_bytes:
        raise InvalidImageError(f"encoded image is {size} bytes, over the limit of {limits.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image is too large: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError, or a plugin's own header error
        raise InvalidImageError(f"not a decodable image ({'/'.join(FORMATS)}): {_reason(exc)}") from exc
    with img:
        _check_size(img.width, img.height, limits)
        width, height = img.size
        if min_side and img.format == "JPEG" and min(width, height) >= 2 * min_side:
            img.draft(None, (min_side, min_side))  # changes img.size only where the file allows it
        drafted = img.size != (width, height)
        # Only a JPEG's EXIF is read before decoding: Pillow's PNG getexif() decodes the whole image to look for it.
        swapped = drafted and _exif_orientation(img) in (5, 6, 7, 8)
        if budget is not None:
            budget.spend(img.width, img.height)
        gate = large_gate(img.width * img.height) if large_gate is not None else nullcontext(run_here)
        with gate as run:
            return run(lambda: _load(img, limits, drafted, (width, height) if swapped else (height, width)))


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block leaves the orientation alone
        return None


def _load(img: Image.Image, limits: DecodeLimits, drafted: bool, original_hw: tuple[int, int]) -> Decoded:
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, zlib errors, ...
        raise InvalidImageError(f"image is truncated or corrupt: {exc}") from exc
    if not drafted:
        _check_size(img.width, img.height, limits)
        return Decoded(_to_rgb(img), img.height, img.width)
    return Decoded(_to_rgb(img), *original_hw)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _WIDE_GRAY_MODES:  # Pillow's convert("RGB") clips these at 255 instead of scaling
        gray = (np.clip(np.asarray(img), 0, 65535).astype(np.uint32) + 128) // 257  # round(v / 257)
    elif img.mode == "F":  # 0..255 intensities; Pillow's convert would truncate instead of round
        gray = np.clip(np.rint(np.nan_to_num(np.asarray(img))), 0, 255)
    else:
        try:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except ValueError as exc:
            raise InvalidImageError(f"unsupported image mode {img.mode}") from exc
    return cv2.cvtColor(gray.astype(np.uint8), cv2.COLOR_GRAY2RGB)


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """rgb as a C-contiguous HxWx3 uint8 array, or InvalidTensorError."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidTensorError(f"expected an HxWx3 uint8 RGB image, got {getattr(rgb, 'shape', None)} "
                                 f"{getattr(rgb, 'dtype', type(rgb).__name__)}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidTensorError(f"image has an empty side: {rgb.shape}")
    return np.ascontiguousarray(rgb)


def prepare_input(rgb: np.ndarray, spec: InputSpec, original_size: tuple[int, int] | None = None) -> tuple[np.ndarray, Transform]:
    """HxWx3 uint8 RGB -> model input without batch dim ((H, W, 3) or (3, H, W)) and its Transform.

    original_size: (height, width) of the image rgb was decoded from at a reduced size (decode_reduced); the
    Transform maps the model input back to it. The result may share memory with rgb when no resize, padding or
    conversion is needed.
    """
    rgb = check_rgb(rgb)
    orig_h, orig_w = original_size or rgb.shape[:2]
    t = compute_transform(orig_h, orig_w, spec.height, spec.width, spec.resize)
    img = rgb
    if (t.resized_h, t.resized_w) != rgb.shape[:2]:
        img = cv2.resize(img, (t.resized_w, t.resized_h), interpolation=cv2.INTER_LINEAR)
    if spec.channel_order == "BGR":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if (t.resized_h, t.resized_w) != (spec.height, spec.width):
        top, left = int(t.pad_y), int(t.pad_x)
        bottom, right = spec.height - t.resized_h - top, spec.width - t.resized_w - left
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(spec.pad_value,) * 3)
    return _to_tensor(img, spec), t


def _to_tensor(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 HxWx3 in spec channel order -> values in spec dtype and layout, one pass per output."""
    if spec.dtype == "uint8":
        return np.ascontiguousarray(img.transpose(2, 0, 1)) if spec.layout == "NCHW" else img
    affine = spec.affine()
    pixels = np.arange(256, dtype=np.float64)[:, None]
    table = pixels.repeat(3, axis=1) if affine is None else pixels * affine[0] - affine[1]  # [256, 3]
    table = table.astype(spec.dtype)
    if spec.layout == "NHWC":  # cv2.LUT with a 3-channel table maps each channel with its own column
        return cv2.LUT(img, table.reshape(256, 1, 3))
    out = np.empty((3, spec.height, spec.width), dtype=spec.dtype)
    for c, (plane, column) in enumerate(zip(cv2.split(img), np.ascontiguousarray(table.T))):
        cv2.LUT(plane, column, dst=out[c])
    return out
