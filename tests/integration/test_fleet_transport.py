"""NatsFleetBus against a real nats-server with JetStream: CAS, watches, pipelined writes, the durable report
consumer, garbage on the bus, and an outage with a restart on the same store."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from fleet.errors import ConflictError, TransportError
from fleet.protocol import BUCKET_DEVICES, BundleRef, Command, DesiredState, InvalidReport, Metrics, Registration, \
    Report, report_subject
from fleet.transport import NatsFleetBus
from tests.fleet_support import assert_gone, nats_server  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

BUNDLE = BundleRef(url="http://127.0.0.1:1/v1.bundle", sha256="a" * 64, size=10)


def desired(generation: int, version: str = "1.1.0", action: str = "install") -> DesiredState:
    return DesiredState(rollout_id="r1", model="detect_detector", version=version, action=action,
                        generation=generation, bundle=BUNDLE if action == "install" else None,
                        issued_at="2026-01-01T00:00:00.000Z")


def report(device_id: str, seq: int, state: str = "installed") -> Report:
    return Report(device_id=device_id, seq=seq, model_version="1.1.0", install_state=state, generation=1,
                  metrics=Metrics(requests=10, p50_ms=5.0, p99_ms=9.0, error_rate=0.0), interval_s=5.0)


async def fetch_until(bus: NatsFleetBus, count: int, deadline_s: float = 15.0) -> list:
    got: list = []
    deadline = time.monotonic() + deadline_s
    while len(got) < count and time.monotonic() < deadline:
        got += await bus.fetch_reports(timeout_s=0.5)
    return got


def test_server_stops_by_pid_and_restarts_on_the_same_port(nats_server):
    url, first = nats_server.url, nats_server.pid
    nats_server.stop()
    assert_gone(first)
    nats_server.start()
    assert nats_server.url == url and nats_server.pid != first and nats_server.is_ready()


def test_rollout_record_compare_and_set(nats_server):
    async def main():
        a = await NatsFleetBus.connect(nats_server.url, name="a")
        b = await NatsFleetBus.connect(nats_server.url, name="b")
        try:
            assert await a.load_rollout("r1") == (None, 0)
            rev = await a.save_rollout("r1", {"stage": 0}, 0)
            with pytest.raises(ConflictError, match="save rollout r1 at revision 0"):
                await b.save_rollout("r1", {"stage": 9}, 0)
            rev2 = await b.save_rollout("r1", {"stage": 1}, rev)
            with pytest.raises(ConflictError):
                await a.save_rollout("r1", {"stage": 2}, rev)  # a lost the race: stale revision
            assert await a.load_rollout("r1") == ({"stage": 1}, rev2)
            await a.put_command("r1", Command("pause", 1, reason="look"))
            assert (await b.get_command("r1")).command == "pause"
            assert await b.get_command("r2") is None
            assert await a.list_rollouts() == ["r1"]  # the command key is not a rollout
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_watch_current_value_then_changes_and_wildcard(nats_server):
    async def main():
        bus = await NatsFleetBus.connect(nats_server.url)
        try:
            await bus.put_desired("dev-1", desired(1))
            await bus.put_desired("dev-2", desired(1, "2.0.0"))
            one = bus.watch_desired("dev-1")
            assert await asyncio.wait_for(one.__anext__(), 10) == ("dev-1", desired(1))
            everyone = bus.watch_desired(None)
            seen = {}
            while len(seen) < 2:
                key, value = await asyncio.wait_for(everyone.__anext__(), 10)
                seen[key] = value
            assert seen["dev-2"].version == "2.0.0"
            await bus.put_desired("dev-1", desired(2, "1.0.0", "rollback"))
            key, value = await asyncio.wait_for(one.__anext__(), 10)
            assert (key, value.generation, value.action) == ("dev-1", 2, "rollback")
            assert (await asyncio.wait_for(everyone.__anext__(), 10))[0] == "dev-1"
            await one.aclose()
            await everyone.aclose()
        finally:
            await bus.close()

    asyncio.run(main())


def test_pipelined_desired_states_for_10000_devices(nats_server):
    async def main():
        bus = await NatsFleetBus.connect(nats_server.url)
        try:
            items = {f"dev-{i:05d}": desired(1, f"1.{i % 7}.0") for i in range(10_000)}
            started = time.perf_counter()
            await bus.put_desired_many(items)
            print(f"put_desired_many(10000): {time.perf_counter() - started:.2f}s")
            assert await bus.get_desired("dev-09999") == items["dev-09999"]
            seen = set()
            watch = bus.watch_desired(None)
            while len(seen) < len(items):
                key, value = await asyncio.wait_for(watch.__anext__(), 20)
                assert value == items[key]
                seen.add(key)
            await watch.aclose()
        finally:
            await bus.close()

    asyncio.run(main())


def test_reports_survive_a_consumer_restart_and_garbage_does_not_break_the_batch(nats_server):
    async def main():
        device = await NatsFleetBus.connect(nats_server.url, name="device")
        controller = await NatsFleetBus.connect(nats_server.url, name="controller")
        try:
            for seq in (1, 2, 3):
                await device.publish_report(report("dev-1", seq))
            await device.nc.publish(report_subject("dev-2"), b"{not json")
            await device.nc.publish(report_subject("dev-3"), json.dumps({"device_id": "dev-3", "seq": 1,
                                                                        "install_state": "lying"}).encode())
            await device.publish_reports([report("dev-4", 1), report("dev-5", 1)])
            await device.nc.flush()
            got = await fetch_until(controller, 7)
            assert [r.device_id for r in got] == ["dev-1"] * 3 + ["dev-2", "dev-3", "dev-4", "dev-5"]
            assert isinstance(got[3], InvalidReport) and "not JSON" in got[3].error
            assert isinstance(got[4], InvalidReport) and "install_state" in got[4].error
            assert got[2].seq == 3 and isinstance(got[6], Report)
            await controller.close()  # the controller goes away; reports keep arriving
            await device.publish_report(report("dev-1", 4))
            controller = await NatsFleetBus.connect(nats_server.url, name="controller-again")
            got = await fetch_until(controller, 1)
            assert [(r.device_id, r.seq) for r in got] == [("dev-1", 4)]  # only what was not read before
            assert await controller.fetch_reports(timeout_s=0.2) == []
        finally:
            await device.close()
            await controller.close()

    asyncio.run(main())


def test_registrations_skip_a_bad_one(nats_server):
    async def main():
        bus = await NatsFleetBus.connect(nats_server.url)
        try:
            for i in range(3):
                await bus.register(Registration(f"dev-{i}", ("x86-avx2",), "cpu", "detect_detector", "1.0.0"))
            await bus.js.publish(f"$KV.{BUCKET_DEVICES}.dev-bad", b'{"device_id": "dev-bad"}')
            found = await bus.registrations()
            assert sorted(found) == ["dev-0", "dev-1", "dev-2"]
            assert found["dev-1"].device_classes == ("x86-avx2",)
        finally:
            await bus.close()

    asyncio.run(main())


def test_outage_fails_calls_clearly_then_the_same_store_serves_again(nats_server):
    async def main():
        bus = await NatsFleetBus.connect(nats_server.url, name="survivor")
        try:
            await bus.put_desired("dev-1", desired(3))
            await bus.publish_report(report("dev-1", 1))
            await bus.save_rollout("r1", {"stage": 2}, 0)
            nats_server.stop()
            with pytest.raises(TransportError, match="get desired state of dev-1"):
                await bus.get_desired("dev-1")
            await asyncio.to_thread(nats_server.start)
            deadline = time.monotonic() + 20
            while not bus.nc.is_connected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (await bus.get_desired("dev-1")).generation == 3  # the same bus, reconnected by itself
            assert (await bus.load_rollout("r1"))[0] == {"stage": 2}
            got = await fetch_until(bus, 1)
            assert [(r.device_id, r.seq) for r in got] == [("dev-1", 1)]
        finally:
            await bus.close()

    asyncio.run(main())


def test_connect_to_nothing_is_a_transport_error(tmp_path):
    from edgestack.server import free_port

    async def main():
        with pytest.raises(TransportError, match="connect to NATS"):
            await NatsFleetBus.connect(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=0.5, connect_deadline_s=2)

    asyncio.run(main())
