"""The spool: durable whole samples, the byte bound, the rate limit, restart; the wire's sample check."""
from __future__ import annotations

import hashlib

import pytest

from loop.errors import SampleError
from loop.spool import Sample, Spool, TokenBucket
from loop.wire import parse_sample, sample_subject


def sample(n: int, size: int = 1000, device: str = "edge-1") -> Sample:
    image = bytes([n % 256]) * size
    return Sample(image, {"sample_id": hashlib.sha256(image).hexdigest(), "device_id": device,
                          "model_version": "1.0.0", "time": "2026-01-01T00:00:00Z",
                          "predictions": [{"box": [1, 2, 3, 4], "score": 0.4, "class_id": 0, "class_name": "x"}]})


def test_put_read_oldest_first_and_survive_a_restart(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    paths = [spool.put(sample(i)) for i in range(3)]
    (tmp_path / ".tmp-0-x.sample.part").write_bytes(b"half a samp")  # a write cut by a crash
    again = Spool(tmp_path, 1 << 20)  # the device restarted
    assert not list(tmp_path.glob(".tmp-*"))
    items = list(again.items())
    assert [p for p, _ in items] == paths
    assert [s.image for _, s in items] == [sample(i).image for i in range(3)]
    assert items[0][1].meta == sample(0).meta


def test_byte_bound_refuses_new_samples_and_frees_after_removal(tmp_path):
    size = len(sample(0).encode())
    spool = Spool(tmp_path, 2 * size + 10)
    assert spool.put(sample(0)) and spool.put(sample(1))
    assert spool.put(sample(2)) is None and spool.counts["dropped_full"] == 1
    assert spool.disk_bytes() <= spool.max_bytes
    Spool(tmp_path, 1).remove(spool.paths()[0])  # another process (the uploader) removes one
    assert spool.put(sample(3)) is not None


def test_rate_limit_is_a_token_bucket():
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert bucket.take() and not bucket.take()


def test_malformed_spool_file_is_moved_aside(tmp_path):
    spool = Spool(tmp_path, 1 << 20)
    (tmp_path / "00000000000000000001-bad.sample").write_bytes(b"not a sample")
    spool.put(sample(1))
    assert [s.image for _, s in spool.items()] == [sample(1).image]
    assert list(tmp_path.glob("*.bad"))


def test_parse_sample_checks_hash_device_and_fields():
    good = sample(5)
    assert parse_sample(sample_subject("edge-1"), good.encode()).meta == good.meta
    with pytest.raises(SampleError, match="subject"):
        parse_sample(sample_subject("edge-2"), good.encode())
    forged = Sample(b"other", good.meta)
    with pytest.raises(SampleError, match="sha256"):
        parse_sample(sample_subject("edge-1"), forged.encode())
    bad = Sample(good.image, {**good.meta, "predictions": [{"box": [1, 2, 3], "score": 0.4, "class_id": 0,
                                                             "class_name": "x"}]})
    with pytest.raises(SampleError, match=r"predictions\[0\].box"):
        parse_sample(sample_subject("edge-1"), bad.encode())
    with pytest.raises(SampleError, match="magic"):
        parse_sample(sample_subject("edge-1"), b"garbage")
    with pytest.raises(SampleError, match="device_id"):
        sample_subject("a.b")
