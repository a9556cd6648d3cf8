"""The learning loop end to end: a real tritonserver pipeline with the sampler step, the spool, the uploader and
the collector on a real nats-server; a cloud outage in the middle, a device restart, the byte bound."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgestack.client import DetectionClient
from edgestack.errors import ClientError
from edgestack.server import TritonServer
from loop.collector import Collector
from loop.sampler import read_stats
from loop.settings import SamplingSettings
from loop.spool import Spool
from loop.uploader import Uploader
from tests.conftest import FIXTURES, IMAGES
from tests.fleet_support import nats_server  # noqa: F401 (fixture)
from tests.integration.conftest import assert_stopped
from tests.loop_support import BackgroundService, detect_sampled, render_sampling, wait_for

pytestmark = pytest.mark.integration

PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
MORE = sorted(p for p in (FIXTURES / "images_more").iterdir() if p.suffix in (".jpg", ".png"))


def stored_images(store: Path) -> int:
    collector = Collector(store)
    try:
        return collector.stats()["images"]
    finally:
        collector.close()


def send(server: TritonServer, photos: list[Path]) -> set[str]:
    """Every photo through the pipeline; the sha256 of those it sampled (each answered with detections)."""
    import hashlib

    sampled = set()
    for photo in photos:
        data = photo.read_bytes()
        _, was_sampled = detect_sampled(server.grpc_url, data)
        if was_sampled:
            sampled.add(hashlib.sha256(data).hexdigest())
    return sampled


def spooled_ids(spool_dir: Path) -> set[str]:
    return {sample.meta["sample_id"] for _, sample in Spool(spool_dir, 1 << 40).items()}


def test_samples_survive_an_outage_and_a_device_restart(tmp_path, nats_server):  # noqa: F811
    spool_dir, store = tmp_path / "spool", tmp_path / "store"
    settings = SamplingSettings(enabled=True, spool_dir=str(spool_dir), rate_per_s=1000.0, burst=1000,
                                device_id="edge-loop-1")
    repo = render_sampling(tmp_path / "repo", settings)
    collector = BackgroundService(lambda stop: Collector(store).run(nats_server.url, stop))
    uploader = BackgroundService(lambda stop: Uploader(Spool(spool_dir, settings.max_bytes), nats_server.url,
                                                       poll_s=0.2).run(stop))
    try:
        with TritonServer(repo, log_path=tmp_path / "triton-1.log") as server:
            pid = server.pid
            first = send(server, PHOTOS)
            assert first, "the fixture photos gave no uncertain image: the keep rule did not fire"
            wait_for(lambda: stored_images(store) == len(first), 60, f"{len(first)} samples at the collector")
            # delivered samples leave the spool (the uploader removes one once JetStream acknowledged it, which can
            # be just after the collector stored it)
            wait_for(lambda: not spooled_ids(spool_dir), 30, "the delivered samples to leave the spool")

            nats_server.stop()  # the cloud goes away
            second = send(server, MORE) - first
            assert second, "images_more gave no new uncertain image"
            wait_for(lambda: spooled_ids(spool_dir) == second, 30, "the outage's samples in the spool")
            assert stored_images(store) == len(first)
        assert_stopped(pid)
        uploader.stop()

        # The device restarts during the outage: the spool is intact, the sampler opens it again.
        assert spooled_ids(spool_dir) == second
        with TritonServer(repo, log_path=tmp_path / "triton-2.log") as server:
            pid = server.pid
            assert send(server, PHOTOS[:1]) <= first
            nats_server.start()  # the cloud is back
            uploader = BackgroundService(lambda stop: Uploader(Spool(spool_dir, settings.max_bytes),
                                                               nats_server.url, poll_s=0.2).run(stop))
            wait_for(lambda: stored_images(store) == len(first | second), 60, "the outage's samples delivered")
            wait_for(lambda: not spooled_ids(spool_dir), 30, "an empty spool")
        assert_stopped(pid)
    finally:
        uploader.stop()
        collector.stop()

    final = Collector(store)
    stats = final.stats()
    assert stats["by_device"] == {"edge-loop-1": len(first | second)}
    assert stats["by_model_version"] == {"detect": len(first | second)}
    assert sum(stats["by_class"].values()) >= len(first | second) - 1  # an empty image may be sampled too
    task = json.loads(final.export_coco(tmp_path / "task").read_text())
    final.close()
    assert {image["sha256"] for image in task["images"]} == first | second
    assert all((tmp_path / "task" / image["file_name"]).is_file() for image in task["images"])
    assert task["annotations"] and all(a["category_id"] >= 1 for a in task["annotations"])


def test_spool_stays_within_its_byte_bound_and_inference_goes_on(tmp_path):
    spool_dir = tmp_path / "spool"
    largest = max(p.stat().st_size for p in PHOTOS + MORE)
    settings = SamplingSettings(enabled=True, spool_dir=str(spool_dir), rate_per_s=1000.0, burst=1000,
                                max_bytes=2 * largest + 4096)
    repo = render_sampling(tmp_path / "repo", settings)
    with TritonServer(repo, log_path=tmp_path / "triton.log") as server:
        pid = server.pid
        with DetectionClient(server.grpc_url, "grpc") as client:  # a bad image: its own error, nothing sampled
            with pytest.raises(ClientError, match="not a decodable image"):
                client.detect(b"not an image")
            assert client.detect((IMAGES / "horses.jpg").read_bytes()).class_names
        for photo in PHOTOS + MORE:  # every request answered, sampled or not
            count, _ = detect_sampled(server.grpc_url, photo.read_bytes())
            assert count >= 0
        wait_for(lambda: read_stats(spool_dir).get("pending") == 0 and read_stats(spool_dir).get("queued", 0) ==
                 read_stats(spool_dir).get("spooled", 0) + read_stats(spool_dir).get("dropped_full", 0),
                 30, "the sampler's queue written")
    assert_stopped(pid)
    stats = read_stats(spool_dir)
    assert stats["dropped_full"] >= 1, stats
    assert Spool(spool_dir, settings.max_bytes).disk_bytes() <= settings.max_bytes
    assert b"not an image" not in b"".join(s.image for _, s in Spool(spool_dir, settings.max_bytes).items())


def test_a_better_retrained_version_starts_a_canary_rollout_on_the_bus(nats_server):  # noqa: F811
    import asyncio
    from types import SimpleNamespace

    from fleet.protocol import BundleRef, Release
    from fleet.strategy import load_strategy
    from fleet.transport import NatsFleetBus
    from loop.promote import promote
    from tests.conftest import ROOT

    metrics = {"1.1.0": {"x86-avx2": {"fidelity_map": 0.95}}, "production": {"x86-avx2": {"fidelity_map": 0.90}}}

    class Registry:  # the two registered versions' metrics, as fleet.registry.Registry reads them
        def show(self, model, ref):
            return SimpleNamespace(metrics=metrics[ref])

        def resolve(self, model, ref):
            return Release(model=model, version=ref, bundles={"x86-avx2": BundleRef("http://x/b.tar", "0" * 64, 10)},
                           metrics=metrics[ref])

    async def run():
        bus = await NatsFleetBus.connect(nats_server.url)
        try:
            result = await promote(Registry(), bus, "detect_detector", "1.1.0", "production",
                                   load_strategy(ROOT / "specs" / "rollout.yaml"), margin=0.02)
            record, _ = await bus.load_rollout(result["rollout_id"])
            return result, record
        finally:
            await bus.close()

    result, record = asyncio.run(run())
    assert result["action"] == "started" and result["decision"]["better"]
    assert record["release"]["version"] == "1.1.0" and record["state"] == result["state"]
