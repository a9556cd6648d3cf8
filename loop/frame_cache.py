"""Frame-result cache for video: a frame close enough to the stream's last computed frame reuses its detections.

Per stream id, the cache keeps the last *computed* frame's thumbnail (grey, downscaled to thumb x thumb by block
means, the downscaled-difference test) and its detections. A new frame is compared with that key frame, not with
the previous frame, so slow drift cannot chain reuse forever: reuse when the mean absolute difference of the
thumbnails is at most max_diff grey levels AND the key frame is at most max_frames frames and max_age_ms old (the
staleness bound), and, with max_block_diff, no block changed by more than that (a person walking into a
static scene moves the mean little but a few blocks a lot). Otherwise the frame is computed and becomes the key frame. Streams beyond max_streams are
forgotten least recently used first.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import numpy as np

from loop.errors import SamplingError

D = TypeVar("D")


@dataclass(frozen=True)
class FrameCacheSettings:
    thumb: int = 32  # thumbnail side in pixels
    max_diff: float = 3.0  # mean absolute grey-level difference (0..255) still "the same frame"
    max_frames: int = 5  # a key frame's detections serve at most this many later frames
    max_age_ms: float = 500.0  # ... and for at most this long
    max_streams: int = 1024
    max_block_diff: float | None = None  # and no thumbnail pixel (a block of the frame) changed by more than this

    def __post_init__(self) -> None:
        for name, low in (("thumb", 2), ("max_frames", 0), ("max_streams", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise SamplingError(f"frame_cache.{name} must be an integer >= {low}, not {value!r}")
        for name in ("max_diff", "max_age_ms", "max_block_diff"):
            value = getattr(self, name)
            if value is None and name == "max_block_diff":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise SamplingError(f"frame_cache.{name} must be a number >= 0, not {value!r}")


def thumbnail(frame: np.ndarray, side: int) -> np.ndarray:
    """A frame (H, W) grey or (H, W, C) colour, any integer or float dtype -> float32 [side, side] grey by block
    means over the largest centred crop divisible by side (after striding very large frames)."""
    frame = np.asarray(frame)
    if frame.ndim not in (2, 3):
        raise SamplingError(f"frame must be (H, W) or (H, W, C), not shape {frame.shape}")
    h, w = frame.shape[:2]
    if h < side or w < side:
        raise SamplingError(f"frame {w}x{h} is smaller than the {side}x{side} thumbnail")
    step = max(1, min(h, w) // (side * 4))  # ~4 samples per block side are plenty for a mean
    frame = frame[::step, ::step]
    frame = frame[..., :3].mean(axis=2, dtype=np.float32) if frame.ndim == 3 else np.asarray(frame, np.float32)
    h, w = frame.shape
    bh, bw = h // side, w // side
    y0, x0 = (h - bh * side) // 2, (w - bw * side) // 2
    crop = frame[y0:y0 + bh * side, x0:x0 + bw * side]
    return crop.reshape(side, bh, side, bw).mean(axis=(1, 3))


@dataclass
class _Key(Generic[D]):
    thumb: np.ndarray
    detections: D
    frame: int  # the stream's frame counter when computed
    at_ms: float


class FrameCache(Generic[D]):
    """get_or_compute(stream_id, frame, compute) -> (detections, reused). Not thread-safe per stream."""

    def __init__(self, settings: FrameCacheSettings = FrameCacheSettings(),
                 clock_ms: Callable[[], float] = lambda: time.monotonic() * 1000.0) -> None:
        self.settings, self.clock_ms = settings, clock_ms
        self._keys: OrderedDict[str, _Key[D]] = OrderedDict()
        self._frames: dict[str, int] = {}
        self.counts = {"frames": 0, "reused": 0, "computed": 0, "stale": 0}

    def lookup(self, stream_id: str, thumb: np.ndarray, now_ms: float) -> D | None:
        """The key frame's detections when this frame may reuse them, else None."""
        key = self._keys.get(stream_id)
        if key is None:
            return None
        s = self.settings
        if self._frames[stream_id] - key.frame > s.max_frames or now_ms - key.at_ms > s.max_age_ms:
            self.counts["stale"] += 1
            return None
        diff = np.abs(thumb - key.thumb)
        if float(diff.mean()) > s.max_diff or (s.max_block_diff is not None and float(diff.max()) > s.max_block_diff):
            return None
        return key.detections

    def store(self, stream_id: str, thumb: np.ndarray, detections: D, now_ms: float) -> None:
        self._keys[stream_id] = _Key(thumb, detections, self._frames.get(stream_id, 0), now_ms)
        self._keys.move_to_end(stream_id)
        while len(self._keys) > self.settings.max_streams:
            old, _ = self._keys.popitem(last=False)
            self._frames.pop(old, None)

    def get_or_compute(self, stream_id: str, frame: np.ndarray, compute: Callable[[np.ndarray], D],
                       now_ms: float | None = None) -> tuple[D, bool]:
        now_ms = self.clock_ms() if now_ms is None else now_ms
        self._frames[stream_id] = self._frames.get(stream_id, 0) + 1
        self.counts["frames"] += 1
        thumb = thumbnail(frame, self.settings.thumb)
        found = self.lookup(stream_id, thumb, now_ms)
        if found is not None:
            self.counts["reused"] += 1
            return found, True
        detections = compute(frame)
        self.counts["computed"] += 1
        self.store(stream_id, thumb, detections, now_ms)
        return detections, False

    @property
    def reuse_rate(self) -> float:
        return self.counts["reused"] / self.counts["frames"] if self.counts["frames"] else 0.0

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "reuse_rate": round(self.reuse_rate, 4), "streams": len(self._keys)}
