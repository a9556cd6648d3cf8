"""backends.router: circuit breaker (fake clock), edge/cloud routing, and the detections batch format."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from backends.common.detections import Detections, pack, unpack
from backends.router.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from backends.router.routing import CLOUD, EDGE, Router


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def dets(scores, class_ids=None, names=None, offset=0.0) -> Detections:
    scores = np.asarray(scores, dtype=np.float32)
    k = len(scores)
    boxes = (np.arange(k * 4, dtype=np.float32).reshape(k, 4) + offset)
    ids = np.asarray(class_ids if class_ids is not None else np.arange(k), dtype=np.int32)
    return Detections(boxes, scores, ids, tuple(names) if names is not None else None)


# --- circuit breaker --------------------------------------------------------------------------


def opened_breaker(clock: FakeClock, threshold: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold, cooldown, clock=clock)
    for _ in range(threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == OPEN
    return breaker


def test_breaker_rejects_bad_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0.0)


def test_breaker_opens_after_threshold_failures():
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    assert breaker.state == CLOSED
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
        assert breaker.state == CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN
    assert breaker.allow() is False


def test_breaker_counts_consecutive_failures_only():
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN


def test_breaker_stays_open_during_cooldown():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=10.0)
    for _ in range(5):
        clock.advance(1.9)  # up to 9.5 s
        assert breaker.allow() is False
        assert breaker.state == OPEN
    clock.advance(0.49)
    assert breaker.allow() is False


def test_breaker_half_open_lets_exactly_one_trial_through():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=10.0)
    clock.advance(10.0)
    assert breaker.state == HALF_OPEN
    assert breaker.allow() is True
    assert breaker.allow() is False
    assert breaker.allow() is False
    assert breaker.state == HALF_OPEN


def test_breaker_half_open_concurrent_allow_calls():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=10.0)
    clock.advance(11.0)
    n = 16
    barrier = threading.Barrier(n)
    results: list[bool] = []
    lock = threading.Lock()

    def worker():
        barrier.wait()
        allowed = breaker.allow()
        with lock:
            results.append(allowed)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n
    assert results.count(True) == 1


def test_breaker_trial_success_closes():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=10.0)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED
    assert all(breaker.allow() for _ in range(5))
    # the failure count restarted: it takes a full threshold of failures to open again
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == CLOSED


def test_breaker_trial_failure_reopens_with_fresh_cooldown():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=10.0)
    clock.advance(15.0)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN
    assert breaker.allow() is False
    clock.advance(9.9)  # measured from the trial's failure, not from the first opening
    assert breaker.state == OPEN
    assert breaker.allow() is False
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_breaker_uses_injected_clock_not_wall_time():
    clock = FakeClock()
    breaker = opened_breaker(clock, cooldown=0.03125)  # a power of two: exact in binary
    time.sleep(0.05)
    assert breaker.allow() is False  # the fake clock has not moved
    clock.advance(0.03125)
    assert breaker.allow() is True


# --- router -----------------------------------------------------------------------------------


class CloudStub:
    def __init__(self, result=None, error: Exception | None = None, delay: float = 0.0):
        self.result = result if result is not None else dets([0.99], [7], ["cloud-thing"])
        self.error = error
        self.delay = delay
        self.calls: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, image: bytes) -> Detections:
        with self._lock:
            self.calls.append(image)
        if self.delay:
            time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.result


def test_confident_edge_result_stays_on_edge():
    cloud = CloudStub()
    router = Router(0.5, cloud)
    try:
        edge = dets([0.9, 0.2])
        [routed] = router.route([b"img"], [edge])
    finally:
        router.close()
    assert routed.source == EDGE
    assert routed.degraded is False
    assert routed.reason == ""
    assert routed.detections is edge
    assert cloud.calls == []


def test_score_equal_to_min_confidence_stays_on_edge():
    cloud = CloudStub()
    router = Router(0.5, cloud)
    try:
        [routed] = router.route([b"img"], [dets([0.5])])
    finally:
        router.close()
    assert routed.source == EDGE and cloud.calls == []


def test_low_confidence_goes_to_cloud():
    cloud_result = dets([0.95], [3], ["car"])
    cloud = CloudStub(result=cloud_result)
    router = Router(0.5, cloud)
    try:
        [routed] = router.route([b"the-image"], [dets([0.3, 0.1])])
    finally:
        router.close()
    assert cloud.calls == [b"the-image"]
    assert routed.source == CLOUD
    assert routed.degraded is False
    assert routed.detections is cloud_result


def test_empty_edge_result_goes_to_cloud():
    cloud = CloudStub()
    router = Router(0.5, cloud)
    try:
        [routed] = router.route([b"x"], [dets([])])
    finally:
        router.close()
    assert routed.source == CLOUD and cloud.calls == [b"x"]


def test_raising_cloud_degrades_to_edge_result():
    cloud = CloudStub(error=TimeoutError("deadline exceeded"))
    router = Router(0.5, cloud)
    edge = dets([0.2])
    try:
        [routed] = router.route([b"img"], [edge])
    finally:
        router.close()
    assert cloud.calls == [b"img"]
    assert routed.source == EDGE
    assert routed.degraded is True
    assert routed.detections is edge
    assert "deadline exceeded" in routed.reason


def test_failures_through_router_open_the_breaker_then_cloud_is_skipped():
    clock = FakeClock()
    breaker = CircuitBreaker(2, 30.0, clock=clock)
    cloud = CloudStub(error=ConnectionError("refused"))
    router = Router(0.5, cloud, breaker)
    try:
        for _ in range(2):
            [routed] = router.route([b"img"], [dets([0.1])])
            assert routed.degraded
        assert breaker.state == OPEN
        assert len(cloud.calls) == 2
        [routed] = router.route([b"img"], [dets([0.1])])
    finally:
        router.close()
    assert len(cloud.calls) == 2  # the open breaker skipped the call
    assert routed.source == EDGE and routed.degraded is True
    assert "open" in routed.reason


def test_open_breaker_skips_the_cloud_call():
    clock = FakeClock()
    breaker = opened_breaker(clock, threshold=1, cooldown=30.0)
    cloud = CloudStub()
    router = Router(0.5, cloud, breaker)
    edge = dets([0.1])
    try:
        [routed] = router.route([b"img"], [edge])
    finally:
        router.close()
    assert cloud.calls == []
    assert routed.source == EDGE
    assert routed.degraded is True
    assert routed.reason
    assert routed.detections is edge


def test_half_open_trial_success_through_router_closes_breaker():
    clock = FakeClock()
    breaker = opened_breaker(clock, threshold=1, cooldown=30.0)
    clock.advance(30.0)
    cloud = CloudStub()
    router = Router(0.5, cloud, breaker)
    try:
        [routed] = router.route([b"img"], [dets([0.1])])
    finally:
        router.close()
    assert routed.source == CLOUD
    assert breaker.state == CLOSED


def test_no_cloud_configured_always_edge():
    router = Router(0.5)
    edges = [dets([0.01]), dets([]), dets([0.99])]
    routed = router.route([b"a", b"b", b"c"], edges)
    router.close()
    assert [r.source for r in routed] == [EDGE] * 3
    assert [r.degraded for r in routed] == [False] * 3
    assert [r.detections for r in routed] == edges
    assert router.wants_cloud(dets([0.0])) is False


def test_mixed_batch_routes_per_image_in_parallel():
    # Every cloud call waits until all four are in flight at once: one after another, the first would wait alone
    # and time out (its image then degrades to the edge result), so this checks parallelism without a clock.
    together = threading.Barrier(4, timeout=30)

    class ParallelCloud(CloudStub):
        def __call__(self, image: bytes) -> Detections:
            together.wait()
            return super().__call__(image)

    cloud = ParallelCloud(result=dets([0.97], [1], ["bicycle"]))
    router = Router(0.5, cloud)
    scores = [0.9, 0.1, 0.2, 0.95, 0.3, 0.4]  # 4 low-confidence images
    images = [f"img{i}".encode() for i in range(len(scores))]
    edges = [dets([s]) for s in scores]
    try:
        routed = router.route(images, edges)
    finally:
        router.close()
    assert [r.source for r in routed] == [EDGE, CLOUD, CLOUD, EDGE, CLOUD, CLOUD], [r.reason for r in routed]
    assert all(r.degraded is False for r in routed)
    assert routed[0].detections is edges[0] and routed[3].detections is edges[3]
    assert all(routed[i].detections is cloud.result for i in (1, 2, 4, 5))
    assert sorted(cloud.calls) == sorted(images[i] for i in (1, 2, 4, 5))
    assert not together.broken


def test_mixed_batch_failures_are_per_image():
    good = dets([0.9], [2], ["car"])

    def cloud(image: bytes) -> Detections:
        if image == b"bad":
            raise RuntimeError("boom")
        return good

    router = Router(0.5, cloud)
    try:
        routed = router.route([b"ok", b"bad", b"edge"], [dets([0.1]), dets([0.2]), dets([0.8])])
    finally:
        router.close()
    assert [(r.source, r.degraded) for r in routed] == [(CLOUD, False), (EDGE, True), (EDGE, False)]
    assert "boom" in routed[1].reason


# --- detections pack / unpack -------------------------------------------------------------------


CLASSES = ("person", "bicycle", "car")


def test_pack_pads_to_largest_k():
    per_image = [dets([0.9, 0.8, 0.7], [0, 1, 2]), dets([]), dets([0.5], [2])]
    boxes, scores, class_ids, names, counts = pack(per_image, CLASSES)
    assert boxes.shape == (3, 3, 4) and boxes.dtype == np.float32
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    assert class_ids.shape == (3, 3) and class_ids.dtype == np.int32
    assert names.shape == (3, 3) and names.dtype == object
    assert counts.shape == (3, 1) and counts.dtype == np.int32
    assert counts.reshape(-1).tolist() == [3, 0, 1]
    # padding: score 0, class -1, empty name, zero box
    assert scores[1].tolist() == [0, 0, 0] and class_ids[1].tolist() == [-1, -1, -1]
    assert names[2].tolist() == [b"car", b"", b""]
    assert np.all(boxes[2, 1:] == 0)
    assert names[0].tolist() == [b"person", b"bicycle", b"car"]


def test_pack_unpack_round_trip_with_class_list():
    per_image = [
        dets([0.9, 0.6], [2, 0], offset=1.5),
        dets([0.4, 0.3, 0.2, 0.1], [1, 1, 0, 2], offset=100.25),
        dets([]),
        dets([0.77], [9]),  # out of the class list: named by its id
    ]
    back = unpack(*pack(per_image, CLASSES))
    assert len(back) == len(per_image)
    expected_names = [("car", "person"), ("bicycle", "bicycle", "person", "car"), (), ("9",)]
    for original, restored, names in zip(per_image, back, expected_names):
        assert len(restored) == len(original)
        np.testing.assert_array_equal(restored.boxes, original.boxes)
        np.testing.assert_array_equal(restored.scores, original.scores)
        np.testing.assert_array_equal(restored.class_ids, original.class_ids)
        assert restored.boxes.shape == (len(original), 4)
        assert restored.boxes.dtype == np.float32 and restored.class_ids.dtype == np.int32
        assert restored.class_names == names


def test_pack_unpack_round_trip_with_own_class_names():
    per_image = [
        dets([0.99, 0.5], [0, 1], names=["dog", "cat"]),
        dets([0.3, 0.2], [5, 6], names=["zebra crossing", "café"]),
    ]
    back = unpack(*pack(per_image, ()))  # names travel with the detections, no class list needed
    assert back[0].class_names == ("dog", "cat")
    assert back[1].class_names == ("zebra crossing", "café")
    np.testing.assert_array_equal(back[1].class_ids, [5, 6])
    np.testing.assert_array_equal(back[0].scores, np.float32([0.99, 0.5]))


def test_pack_empty_batch_and_all_empty_images():
    boxes, scores, class_ids, names, counts = pack([dets([]), dets([])], CLASSES)
    assert boxes.shape == (2, 0, 4) and counts.reshape(-1).tolist() == [0, 0]
    back = unpack(boxes, scores, class_ids, names, counts)
    assert [len(d) for d in back] == [0, 0]
    assert back[0].best_score == 0.0
    assert unpack(*pack([], CLASSES)) == []


def test_best_score():
    assert dets([0.2, 0.8, 0.5]).best_score == pytest.approx(0.8)
    assert dets([]).best_score == 0.0
