"""The sampler's plain parts: candidates from a raw `detections` tensor, the keep rule on them, and a hand-off
that never waits (a full queue drops the sample)."""
from __future__ import annotations

import threading

import numpy as np

from backends.common.geometry import Transform
from loop.sampler import SampleSink, candidates, judge, read_stats
from loop.settings import SamplingSettings
from loop.uncertainty import ImageUncertainty

NAMES = ("cat", "dog", "car")
IDENTITY = Transform(orig_h=100, orig_w=100, scale_x=1.0, scale_y=1.0, pad_x=0.0, pad_y=0.0, resized_w=100,
                     resized_h=100)


def raw(rows):
    out = np.zeros((10, 6), np.float32)  # format `detections`: x1 y1 x2 y2 score class, padded with zeros
    out[:len(rows)] = rows
    return out


def test_two_classes_on_one_object_are_kept_one_sure_class_is_not():
    settings = SamplingSettings(entropy_bits=0.9, unsure_low=0.35, unsure_high=0.5)
    confused = raw([[10, 10, 50, 50, 0.7, 0], [11, 10, 50, 50, 0.6, 1], [60, 60, 90, 90, 0.3, 2]])
    cands = candidates([confused], IDENTITY, "detections", len(NAMES), 0.05)
    assert len(cands[1]) == 3
    detection = (np.array([[10, 10, 50, 50]], np.float32), np.array([0.7], np.float32), np.array([0]))
    verdict = judge(detection, cands, settings, NAMES)
    assert verdict.keep and "cat/dog" in verdict.reason and verdict.entropy[0] > 0.9
    sure = candidates([raw([[10, 10, 50, 50, 0.9, 0], [60, 60, 90, 90, 0.3, 2]])], IDENTITY, "detections", 3, 0.05)
    detection = (np.array([[10, 10, 50, 50]], np.float32), np.array([0.9], np.float32), np.array([0]))
    assert not judge(detection, sure, settings, NAMES).keep


def test_offer_never_waits_for_a_slow_disk(tmp_path):
    sink = SampleSink(SamplingSettings(enabled=True, spool_dir=str(tmp_path), queue=1, rate_per_s=1000.0,
                                       burst=1000), NAMES, "1.0.0")
    release = threading.Event()
    real_put = sink.spool.put
    sink.spool.put = lambda sample: (release.wait(10), real_put(sample))[1]  # a disk that hangs
    keep = ImageUncertainty((1.5,), (0.1,), 0.6, "entropy")
    found = (np.array([[1, 1, 5, 5]], np.float32), np.array([0.6], np.float32), np.array([1]))
    results = [sink.offer(bytes([i]) * 100, found, keep) for i in range(5)]  # returns at once, disk or not
    assert results[0] and not all(results)
    assert sink.counts["dropped_queue"] >= 1
    assert not sink.offer(b"x", found, ImageUncertainty((0.0,), (1.0,), 0.9, None))  # not uncertain
    release.set()
    sink.close()
    stats = read_stats(tmp_path)
    assert stats["spooled"] == stats["queued"] >= 1 and stats["seen"] == 6
    assert len(sink.spool) == stats["spooled"]
