"""The sampling side path inside the Triton pipeline: per image, the keep rule on its detections and the model's
raw candidates, and a hand-off to the spool that never waits.

SampleSink.offer() runs in the sampler step's execute (microseconds: the keep rule, a token, a queue put); a
daemon thread encodes the sample and writes it to the spool (fsync included) off the request path. A full queue
drops the sample (counted), so a slow disk slows sampling, never inference. The counts are written to
<spool>/.stats.json by the writer thread.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.common.geometry import Transform, map_boxes_to_original
from backends.postprocess.formats import get_format
from loop.settings import SamplingSettings
from loop.spool import Sample, Spool
from loop.uncertainty import ImageUncertainty, assess, class_scores

STATS_FILE = ".stats.json"


def candidates(raws: Sequence[np.ndarray], transform: Transform | np.ndarray, output_format: str, num_classes: int,
               candidate_score: float, options: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw detector candidates at or above candidate_score, boxes on original pixels (no NMS)."""
    if not isinstance(transform, Transform):
        transform = Transform.from_array(transform)
    boxes, scores, classes = get_format(output_format).decode(list(raws), num_classes,
                                                             score_threshold=candidate_score, options=options)
    if len(scores) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    return map_boxes_to_original(boxes, transform), scores, classes


def judge(detections: tuple[np.ndarray, np.ndarray, np.ndarray], cands: tuple[np.ndarray, np.ndarray, np.ndarray],
          settings: SamplingSettings, class_names: tuple[str, ...]) -> ImageUncertainty:
    """The keep rule on one image's final detections (boxes, scores, class ids) and raw candidates."""
    boxes, scores, class_ids = detections
    per_class = class_scores(boxes, scores, class_ids, *cands, num_classes=len(class_names),
                             same_object_iou=settings.same_object_iou)
    return assess(scores, per_class, entropy_threshold=settings.entropy_bits, unsure_low=settings.unsure_low,
                  unsure_high=settings.unsure_high, class_names=class_names)


def content_type(image: bytes) -> str:
    if image[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"


def make_sample(image: bytes, detections, uncertainty: ImageUncertainty, class_names: tuple[str, ...],
                device_id: str, model_version: str) -> Sample:
    """The sample document: the image as sent, its predictions with their uncertainty, who and when."""
    boxes, scores, class_ids = detections
    predictions = [{"box": [round(float(v), 2) for v in box], "score": round(float(s), 4), "class_id": int(c),
                    "class_name": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c)),
                    "entropy": round(e, 4), "margin": round(m, 4)}
                   for box, s, c, e, m in zip(boxes, scores, class_ids, uncertainty.entropy, uncertainty.margin)]
    meta = {"sample_id": hashlib.sha256(image).hexdigest(), "device_id": device_id, "model_version": model_version,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "content_type": content_type(image), "reason": uncertainty.reason, "predictions": predictions}
    return Sample(image=image, meta=meta)


class SampleSink:
    """The device's sampler: offer() decides and queues, a daemon thread writes to the spool."""

    def __init__(self, settings: SamplingSettings, class_names: tuple[str, ...], model_version: str) -> None:
        self.settings, self.class_names, self.model_version = settings, class_names, model_version
        self.spool = Spool(settings.spool_dir, settings.max_bytes, rate_per_s=settings.rate_per_s,
                           burst=settings.burst)
        self.counts = {"seen": 0, "uncertain": 0, "queued": 0, "dropped_queue": 0, "too_big": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, name="edgestack-sampler", daemon=True)
        self._thread.start()

    def offer(self, image: bytes, detections, uncertainty: ImageUncertainty) -> bool:
        """True when the image was queued for the spool (never blocks)."""
        self.counts["seen"] += 1
        if not uncertainty.keep:
            return False
        self.counts["uncertain"] += 1
        if len(image) > self.settings.max_image_bytes:
            self.counts["too_big"] += 1
            return False
        if not self.spool.admit():
            return False
        try:
            self._queue.put_nowait((image, detections, uncertainty))
        except queue.Full:
            self.counts["dropped_queue"] += 1
            return False
        self.counts["queued"] += 1
        return True

    def _write(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            image, detections, uncertainty = item
            try:
                self.spool.put(make_sample(image, detections, uncertainty, self.class_names,
                                           self.settings.device_id, self.model_version))
            except Exception as exc:  # a full or broken disk must not kill the thread
                self.counts["write_errors"] = self.counts.get("write_errors", 0) + 1
                self.counts["last_error"] = str(exc)
            self.write_stats()

    def stats(self) -> dict[str, Any]:
        return {**self.counts, **self.spool.counts, "pending": self._queue.qsize(), "time": time.time()}

    def write_stats(self) -> None:
        path = Path(self.settings.spool_dir) / STATS_FILE
        tmp = path.with_name(f"{STATS_FILE}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.stats()))
            os.replace(tmp, path)
        except OSError:
            pass

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to timeout_s), then stop the thread."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.write_stats()


def read_stats(spool_dir: Path | str) -> dict[str, Any]:
    """The sampler's last written counts ({} before its first sample)."""
    try:
        return json.loads((Path(spool_dir) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return {}
