"""Image preprocessing on a CUDA GPU with CuPy: the contract of image_ops.prepare_input.

The steps are written once against an array module `xp` (numpy or cupy), so the GPU code is
checked on the CPU with numpy. CuPy is imported lazily: this module imports without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from backends.common.geometry import Transform, compute_transform
from backends.preprocess.image_ops import InputSpec, check_rgb

if TYPE_CHECKING:
    import cupy


def gpu_available() -> bool:
    """True if CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver/runtime missing or broken
        return False


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.INTER_LINEAR sampling on one axis: left index, right index, right weight."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5  # half-pixel centres
    src = np.clip(src, 0, in_size - 1)  # edge clamp, like cv2 (no antialiasing)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(xp: Any, img: Any, out_h: int, out_w: int) -> Any:
    """Bilinear resize of an HxW or HxWxC array like cv2.INTER_LINEAR; returns float32 (unrounded)."""
    y0, y1, wy = (xp.asarray(a) for a in _taps(img.shape[0], out_h))
    x0, x1, wx = (xp.asarray(a) for a in _taps(img.shape[1], out_w))
    extra = (1,) * (img.ndim - 2)
    wy, wx = wy.reshape((-1, 1) + extra), wx.reshape((-1,) + extra)
    y0, y1 = y0[:, None], y1[:, None]
    top_left, top_right = img[y0, x0].astype(xp.float32), img[y0, x1].astype(xp.float32)
    bottom_left, bottom_right = img[y1, x0].astype(xp.float32), img[y1, x1].astype(xp.float32)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    return top + (bottom - top) * wy


def prepare_input_xp(xp: Any, rgb: Any, spec: InputSpec) -> tuple[Any, Transform]:
    """prepare_input's steps on an HxWx3 uint8 RGB array of module xp, computed with xp."""
    orig_h, orig_w = rgb.shape[:2]
    t = compute_transform(orig_h, orig_w, spec.height, spec.width, spec.resize)
    img = rgb[..., ::-1] if spec.channel_order == "BGR" else rgb
    if (t.resized_h, t.resized_w) != (orig_h, orig_w):
        resized = resize_bilinear(xp, img, t.resized_h, t.resized_w)
        img = xp.clip(xp.rint(resized), 0, 255).astype(xp.uint8)  # uint8 like cv2, so values match
    if (t.resized_h, t.resized_w) != (spec.height, spec.width):
        top, left = int(t.pad_y), int(t.pad_x)
        canvas = xp.full((spec.height, spec.width, 3), spec.pad_value, dtype=xp.uint8)
        canvas[top : top + t.resized_h, left : left + t.resized_w] = img
        img = canvas
    nchw = spec.layout == "NCHW"
    if nchw:
        img = img.transpose(2, 0, 1)
    affine = spec.affine()
    if affine is None:
        return img.astype(spec.dtype, order="C", copy=False), t
    shape = (3, 1, 1) if nchw else (3,)
    a, b = (xp.asarray(v.astype(np.float32).reshape(shape)) for v in affine)
    values = img.astype(xp.float32, order="C") * a
    values -= b
    return values.astype(spec.dtype, copy=False), t


def prepare_input_gpu(rgb: np.ndarray, spec: InputSpec, device_id: int = 0) -> tuple["cupy.ndarray", Transform]:
    """HxWx3 uint8 RGB on the host -> model input on GPU device_id (no batch dim) and its Transform."""
    import cupy

    rgb = check_rgb(rgb)
    with cupy.cuda.Device(device_id):
        return prepare_input_xp(cupy, cupy.asarray(rgb), spec)
