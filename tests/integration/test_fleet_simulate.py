"""Integration: 200 simulated devices with faults and the real controller over a real NATS server (JetStream):
a release that is bad on one device class is rolled back automatically in its canary, with the reason naming
the class, and every reachable canary device is back on its previous version. And `edgestack fleet simulate`
as a process against the same kind of server."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.controller import Controller
from fleet.protocol import BundleRef, Release
from fleet.rollout import State, new_rollout
from fleet.simulate import FleetSimulator, make_devices
from fleet.simulate_faults import BadClass, ClassMix, FaultSpec, MetricModel
from fleet.strategy import Strategy
from fleet.transport import NatsFleetBus
from tests.fleet_support import assert_gone, nats_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("x86-vnni", "x86-avx2", "arm64-neon", "cuda-sm87")
FAULTS = "offline=0.03,slow=0.03,flapping=0.03,silent=0.02,liar=0.02"
STRATEGY = {
    "stages": [{"name": "canary", "percentage": 10, "duration": "60s",
                "rollback_trigger": {"accuracy_drop": 3.0, "latency_increase": 50, "error_rate": 5.0}},
               {"name": "early_access", "percentage": 50, "duration": "60s",
                "rollback_trigger": {"accuracy_drop": 1.0, "latency_increase": 20, "error_rate": 2.0}},
               {"name": "general_availability", "percentage": 100, "duration": "0s"}],
    "analysis": {"interval": "1s", "failure_limit": 2, "inconclusive": "continue", "min_reporting_devices": 0.5,
                 "max_device_staleness": "4s"}}


def release() -> Release:
    bundles = {c: BundleRef(url=f"http://registry.invalid/{c}/1.1.0.bundle", sha256=f"{i + 1:x}" * 64, size=4096)
               for i, c in enumerate(CLASSES)}
    return Release(model="detect_detector", version="1.1.0", bundles=bundles)


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.1)


def test_bad_class_rolls_back_its_canary(nats_server):
    async def scenario():
        faults = FaultSpec.parse(FAULTS)
        devices = make_devices(200, 11, faults, ClassMix.parse())
        sim_bus = await NatsFleetBus.connect(nats_server.url, name="simulator")
        bus = await NatsFleetBus.connect(nats_server.url, name="controller")
        events: list[dict] = []
        sim = FleetSimulator(sim_bus, devices, interval_s=1.0, install_s=0.5, faults=faults,
                             metrics=MetricModel(bad=BadClass("cuda-sm87", "accuracy", 0.10)))
        controller = Controller(bus, log=events.append, fetch_timeout_s=0.1)
        stop = asyncio.Event()
        tasks = []
        try:
            await sim.start()
            tasks = [asyncio.create_task(sim.run(stop)), asyncio.create_task(controller.run(stop, idle_s=0.1))]
            # the before-update baseline needs reports in the controller's hands first
            await until(lambda: len(controller.latest.latest) >= 150, 30, "reports of 150 devices")
            rollout = new_rollout("sim-bad-cuda", release(), Strategy.from_dict(STRATEGY), time.time())
            await bus.save_rollout(rollout.id, rollout.to_dict(), 0)
            record: dict = {}

            async def refresh() -> None:
                record.update((await bus.load_rollout(rollout.id))[0])

            deadline = time.monotonic() + 90
            while record.get("state") not in ("ROLLED_BACK", "COMPLETED", "ABORTED", "PAUSED"):
                assert time.monotonic() < deadline, f"rollout still {record.get('state')}: {events[-5:]}"
                await asyncio.sleep(0.2)
                await refresh()
            canary = sim.stage_devices(rollout.id)
            await until(lambda: not sim.unreverted(None, rollout.id), 60, "every reachable canary device reverted")
            return record, canary, sim, devices
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sim_bus.close()
            await bus.close()

    record, canary, sim, devices = asyncio.run(scenario())
    assert record["state"] == State.ROLLED_BACK.value, record["events"][-5:]
    revert = record["revert"]
    assert "cuda-sm87" in revert["reason"] and "accuracy_drop" in revert["reason"]
    assert record["stage"] == 0  # the canary, no further
    assigned = {d for group in record["assignments"] for d in group["devices"]}
    assert assigned == {d.device_id for d in canary}
    assert 20 <= len(canary) <= 24 and {d.device_class for d in canary} == set(CLASSES)
    reachable = [d for d in canary if d.reachable]
    assert reachable and all(d.version is None and d.install_state == "rolled_back" for d in reachable)
    assert all(d.version is None for d in devices if d.device_id not in assigned)  # nobody else was touched
    assert sim.stats.lies > 0 and sim.stats.send_errors == 0


def test_simulate_command_registers_and_reports(nats_server, tmp_path):
    timeline = tmp_path / "timeline.jsonl"
    command = [sys.executable, "-m", "fleet.simulate_cli", "fleet", "simulate", "--nats", nats_server.url,
               "--devices", "60", "--faults", "offline=0.1,liar=0.1", "--seed", "2", "--interval", "0.5",
               # the duration counts from before the connection and the 60 registrations, which a loaded machine
               # can stretch: room for a progress line and a round of reports after them
               "--duration", "6", "--progress-every", "1", "--timeline", str(timeline)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert_gone(process.pid)
    assert process.returncode == 0, output
    assert "60 simulated devices" in output and "registered 60 devices" in output and "final:" in output

    async def registered() -> int:
        bus = await NatsFleetBus.connect(nats_server.url, name="check")
        try:
            return len(await bus.registrations())
        finally:
            await bus.close()

    assert asyncio.run(registered()) == 60
    lines = timeline.read_text().splitlines()
    assert len(lines) >= 2
    last = json.loads(lines[-1])
    assert last["devices"] == 60 and last["up"] == 54 and last["stats"]["reports"] > 54
