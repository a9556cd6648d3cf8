"""The frame cache: near-identical frames reuse, changes and staleness recompute, per stream."""
from __future__ import annotations

import numpy as np
import pytest

from loop.errors import SamplingError
from loop.frame_cache import FrameCache, FrameCacheSettings, thumbnail

RNG = np.random.default_rng(0)
FRAME = RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)


def noisy(frame: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    return np.clip(frame + RNG.normal(0, sigma, frame.shape), 0, 255).astype(np.uint8)


def run(cache, frames, stream="cam", step_ms=40.0):
    calls = []

    def compute(frame):
        calls.append(1)
        return len(calls)

    return [cache.get_or_compute(stream, f, compute, now_ms=i * step_ms) for i, f in enumerate(frames)], calls


def test_thumbnail_is_block_means_of_grey():
    frame = np.zeros((64, 64), np.uint8)
    frame[:32] = 200
    thumb = thumbnail(frame, 2)
    np.testing.assert_allclose(thumb, [[200, 200], [0, 0]])
    with pytest.raises(SamplingError, match="smaller"):
        thumbnail(np.zeros((8, 8)), 32)


def test_noisy_copies_reuse_until_the_frame_bound():
    cache = FrameCache(FrameCacheSettings(max_frames=3, max_age_ms=10_000))
    results, calls = run(cache, [noisy(FRAME) for _ in range(9)])
    assert [reused for _, reused in results] == [False, True, True, True] * 2 + [False]
    assert len(calls) == 3 and cache.reuse_rate == pytest.approx(6 / 9)


def test_age_bound_and_a_changed_scene_recompute():
    cache = FrameCache(FrameCacheSettings(max_frames=100, max_age_ms=100))
    results, _ = run(cache, [FRAME] * 5, step_ms=60)  # 0, 60 (reuse), 120 (too old), 180 (reuse), 240 (old)
    assert [r for _, r in results] == [False, True, False, True, False]
    cache = FrameCache(FrameCacheSettings())
    changed = FRAME.copy()
    changed[30:90, 40:120] = 255 - changed[30:90, 40:120]
    results, _ = run(cache, [FRAME, changed])
    assert [r for _, r in results] == [False, False]


def test_streams_are_separate_and_bounded():
    cache = FrameCache(FrameCacheSettings(max_streams=1))
    calls = []
    for stream in ("a", "b", "a"):
        cache.get_or_compute(stream, FRAME, lambda f: calls.append(stream) or stream, now_ms=0)
    assert calls == ["a", "b", "a"]  # "a" was forgotten when "b" came


def test_bad_settings_are_named():
    with pytest.raises(SamplingError, match="frame_cache.max_diff"):
        FrameCacheSettings(max_diff=-1)


def test_block_bound_catches_a_small_local_change_the_mean_misses():
    moved = FRAME.copy()
    moved[56:66, 76:88] = 255 - moved[56:66, 76:88]  # one small object changes (inside the centred crop)
    loose = FrameCache(FrameCacheSettings(max_diff=5.0))
    strict = FrameCache(FrameCacheSettings(max_diff=5.0, max_block_diff=20.0))
    assert [r for _, r in run(loose, [FRAME, moved])[0]] == [False, True]
    assert [r for _, r in run(strict, [FRAME, moved])[0]] == [False, False]
