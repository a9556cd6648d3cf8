"""Confidence-based edge/cloud routing. Ensembles cannot branch, so the router decides per image."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from backends.common.detections import Detections
from backends.router.breaker import CircuitBreaker

EDGE, CLOUD = "edge", "cloud"
NO_DETECTIONS = Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32), ())


@dataclass(frozen=True)
class Routed:
    detections: Detections
    source: str
    degraded: bool
    reason: str = ""


class Router:
    """Sends an image to the cloud when the edge's best score is below min_confidence.

    cloud_call(image_bytes) returns the cloud's Detections or raises (timeout, refused, error); the
    breaker stops calling a cloud that keeps failing. Without cloud_call every image stays on the edge.
    """

    def __init__(self, min_confidence: float, cloud_call: Optional[Callable[[bytes], Detections]] = None,
                 breaker: Optional[CircuitBreaker] = None, max_parallel: int = 8):
        self.min_confidence = min_confidence
        self.cloud_call = cloud_call
        self.breaker = breaker
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="cloud") if cloud_call else None

    def wants_cloud(self, edge: Detections) -> bool:
        return self.cloud_call is not None and edge.best_score < self.min_confidence

    def _via_cloud(self, image: bytes, edge: Detections) -> Routed:
        if self.breaker is not None and not self.breaker.allow():
            return Routed(edge, EDGE, True, "cloud circuit open")
        try:
            result = self.cloud_call(image)
        except Exception as exc:  # noqa: BLE001 - any cloud failure degrades to the edge answer
            if self.breaker is not None:
                self.breaker.record_failure()
            return Routed(edge, EDGE, True, f"cloud failed: {exc}")
        if self.breaker is not None:
            self.breaker.record_success()
        return Routed(result, CLOUD, False)

    def route(self, images: Sequence[bytes], edge: Sequence[Detections],
              failed: Optional[Sequence[bool]] = None) -> list[Routed]:
        """One decision per image; cloud calls for a batch run in parallel, each under its own deadline.
        A failed image (preprocess could not use it: its STATUS) gets no detections and never goes to the cloud."""
        routed: list[Optional[Routed]] = [None] * len(edge)
        pending = {}
        for i, (image, det) in enumerate(zip(images, edge)):
            if failed is not None and failed[i]:
                routed[i] = Routed(NO_DETECTIONS, EDGE, False, "")
            elif self.wants_cloud(det):
                pending[i] = self._pool.submit(self._via_cloud, image, det)
            else:
                routed[i] = Routed(det, EDGE, False)
        for i, future in pending.items():
            routed[i] = future.result()
        return routed  # type: ignore[return-value]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
