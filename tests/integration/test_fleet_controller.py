"""The rollout controller as a real process on a real NATS server (JetStream), with a few dozen scripted devices
in the test (one asyncio loop: a wildcard watch of the desired states, a report from every device every 0.3 s).

- The controller is killed with SIGKILL in the middle of the early-access stage; a new one resumes from the
  bucket and completes the rollout; every device installed exactly once and SIGTERM stops the second cleanly.
- A release that is bad on one device class is rolled back automatically: the reason names the trigger and the
  class, and every device is back on the previous version.
Rollouts are started and commanded with the CLI (python -m fleet.rollout_cli); processes are stopped by PID.
"""
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

from fleet.protocol import BundleRef, DesiredState, Metrics, Registration, Release, Report
from fleet.rollout import Rollout, State
from fleet.transport import NatsFleetBus
from tests.conftest import ROOT
from tests.fleet_support import assert_gone, nats_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

CLASSES = {"x86-avx2": 14, "x86-vnni": 10, "arm64-neon": 6}
STRATEGY = """
stages:
  - {name: canary, percentage: 10, duration: 2s,
     rollback_trigger: {accuracy_drop: 3.0, latency_increase: 50, error_rate: 5.0}}
  - {name: early_access, percentage: 50, duration: 3s,
     rollback_trigger: {accuracy_drop: 1.0, latency_increase: 20, error_rate: 2.0}}
  - {name: general_availability, percentage: 100, duration: 0s,
     rollback_trigger: {accuracy_drop: 1.0, latency_increase: 20, error_rate: 2.0}}
analysis: {interval: 1s, failure_limit: 2, inconclusive: continue, min_reporting_devices: 0.8,
           max_device_staleness: 5s}
"""
GOOD = Metrics(requests=50, p50_ms=20.0, p99_ms=45.0, error_rate=0.2, accuracy=0.95)
BAD = Metrics(requests=50, p50_ms=20.0, p99_ms=45.0, error_rate=0.2, accuracy=0.70)


class ScriptedFleet:
    """Devices that act on each new desired state at once and report every `every_s`."""

    def __init__(self, bus: NatsFleetBus, bad_class: str | None = None, every_s: float = 0.3):
        self.bus, self.bad_class, self.every_s = bus, bad_class, every_s
        self.devices = {f"{c}-{i:02d}": {"cls": c, "version": "1.0.0", "state": "idle", "generation": 0, "seq": 0}
                        for c, n in CLASSES.items() for i in range(n)}
        self.acted: list[tuple[str, int, str]] = []

    async def register(self) -> None:
        for device_id, d in self.devices.items():
            await self.bus.register(Registration(device_id=device_id, device_classes=(d["cls"], "cpu"),
                                                 target="cpu", model="detect_detector", model_version="1.0.0"))

    def act(self, device_id: str, desired: DesiredState | None) -> None:
        d = self.devices.get(device_id)
        if d is None or desired is None or desired.generation <= d["generation"]:
            return
        self.acted.append((device_id, desired.generation, desired.action))
        d["generation"] = desired.generation
        d["version"] = desired.version
        d["state"] = "installed" if desired.action == "install" else "rolled_back"

    async def watch(self) -> None:
        async for device_id, desired in self.bus.watch_desired(None):
            self.act(device_id, desired)

    async def report_forever(self) -> None:
        while True:
            for device_id, d in self.devices.items():
                d["seq"] += 1
                bad = d["cls"] == self.bad_class and d["version"] == "1.1.0"
                await self.bus.publish_report(Report(
                    device_id=device_id, seq=d["seq"], model_version=d["version"], install_state=d["state"],
                    generation=d["generation"], metrics=BAD if bad else GOOD, interval_s=self.every_s))
            await asyncio.sleep(self.every_s)


def cli(nats_url: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleet.rollout_cli", *args, "--nats", nats_url], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            start_new_session=True, **popen)


def start_controller(nats_url: str, log: Path) -> subprocess.Popen:
    return cli(nats_url, "fleet", "controller", "--registration-refresh", "1", stderr=log.open("ab"),
               stdout=subprocess.DEVNULL)


def start_rollout(nats_url: str, tmp: Path, rollout_id: str) -> None:
    (tmp / "strategy.yaml").write_text(STRATEGY)
    release = Release(model="detect_detector", version="1.1.0",
                      bundles={c: BundleRef(url=f"http://127.0.0.1:9/{c}.bundle", sha256="ab" * 32, size=100)
                               for c in CLASSES})
    (tmp / "release.json").write_text(json.dumps(release.to_dict()))
    done = cli(nats_url, "rollout", "start", "--strategy", str(tmp / "strategy.yaml"), "--release",
               str(tmp / "release.json"), "--id", rollout_id, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = done.communicate(timeout=60)
    assert done.returncode == 0, out.decode()
    assert f"rollout {rollout_id} started" in out.decode()


async def wait_for(bus: NatsFleetBus, rollout_id: str, predicate, timeout_s: float, log: Path) -> Rollout:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data, _ = await bus.load_rollout(rollout_id)
        if data is not None:
            rollout = Rollout.from_dict(data)
            if predicate(rollout):
                return rollout
        await asyncio.sleep(0.2)
    pytest.fail(f"rollout {rollout_id} did not get there in {timeout_s}s; controller log:\n"
                + log.read_text()[-3000:])


def kill(process: subprocess.Popen, sig: int) -> int:
    os.killpg(process.pid, sig)
    code = process.wait(timeout=30)
    assert_gone(process.pid)
    return code


async def with_fleet(nats_url: str, bad_class: str | None, scenario):
    bus = await NatsFleetBus.connect(nats_url, name="test")
    fleet = ScriptedFleet(bus, bad_class)
    await fleet.register()
    tasks = [asyncio.create_task(fleet.watch()), asyncio.create_task(fleet.report_forever())]
    try:
        await scenario(bus, fleet)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bus.close()


def test_a_controller_killed_mid_stage_is_resumed_by_a_new_one_and_the_rollout_completes(nats_server, tmp_path):
    log = tmp_path / "controller.log"
    url = nats_server.url

    async def scenario(bus, fleet):
        await asyncio.sleep(0.5)  # a report from everyone: the canary's baseline
        start_rollout(url, tmp_path, "r1")
        first = start_controller(url, log)
        try:
            mid = await wait_for(bus, "r1", lambda r: r.stage == 1 and r.stage_started_at is not None, 60, log)
        finally:
            assert kill(first, signal.SIGKILL) == -signal.SIGKILL
        assert mid.state is State.RUNNING
        second = start_controller(url, log)
        try:
            done = await wait_for(bus, "r1", lambda r: r.terminal, 90, log)
        finally:
            assert kill(second, signal.SIGTERM) == 0
        assert done.state is State.COMPLETED, done.events[-5:]
        assert {d["version"] for d in fleet.devices.values()} == {"1.1.0"}
        installs = [(device, generation) for device, generation, action in fleet.acted if action == "install"]
        assert len(installs) == len(set(installs)) == len(fleet.devices)
        assert {e["event"] for e in done.events} >= {"stage_started", "analysis", "desired_written"}
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert [e["event"] for e in lines].count("controller_started") == 2
        assert lines[-1]["event"] == "controller_stopped"
        status = cli(url, "rollout", "status", "r1", stdout=subprocess.PIPE)
        out, _ = status.communicate(timeout=60)
        assert status.returncode == 0 and "COMPLETED" in out.decode() and "general_availability" in out.decode()

    asyncio.run(with_fleet(url, None, scenario))


def test_a_release_bad_on_one_class_is_rolled_back_and_says_why(nats_server, tmp_path):
    log = tmp_path / "controller.log"
    url = nats_server.url

    async def scenario(bus, fleet):
        await asyncio.sleep(0.5)
        start_rollout(url, tmp_path, "bad1")
        controller = start_controller(url, log)
        try:
            done = await wait_for(bus, "bad1", lambda r: r.terminal, 90, log)
        finally:
            assert kill(controller, signal.SIGTERM) == 0
        assert done.state is State.ROLLED_BACK and done.stage == 0
        assert "accuracy_drop" in done.revert["reason"] and "arm64-neon" in done.revert["reason"]
        assert done.revert["seconds"] is not None
        assert {d["version"] for d in fleet.devices.values()} == {"1.0.0"}
        reverted = {device for device, _, action in fleet.acted if action == "rollback"}
        assert reverted == set(done.assignments)

    asyncio.run(with_fleet(url, "arm64-neon", scenario))
