"""fleet.device: the decision table, and DeviceClient acting on desired states through a scripted agent and the
in-memory bus (tests.unit.fleet_fakes): what it calls on the agent, what it reports, what survives a restart."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from fleet.device import INELIGIBLE, INSTALL, NOTHING, ROLLBACK, DeviceClient, decide
from fleet.protocol import BundleRef, DesiredState, Metrics, Report
from sidecar.errors import HealthGateError
from tests.unit.fleet_fakes import FakeBus

BUNDLE = BundleRef(url="http://files/v1.2.0.bundle", sha256="b" * 64, size=123)


def desired(generation: int, version: str | None, action: str = "install", model: str = "detect_detector",
            rollout: str = "r1", reason: str | None = None) -> DesiredState:
    return DesiredState(rollout_id=rollout, model=model, version=version, action=action, generation=generation,
                        bundle=BundleRef(f"http://files/v{version}.bundle", BUNDLE.sha256, BUNDLE.size)
                        if action == "install" else None, reason=reason)


@pytest.mark.parametrize("want, serving, previous, has_previous, choice", [
    (desired(1, "1.2.0"), "1.2.0", None, False, NOTHING),
    (desired(1, None, "rollback"), None, None, False, NOTHING),  # already on the version it shipped with
    (desired(1, "1.2.0"), "1.1.0", None, True, INSTALL),
    (desired(1, "1.1.0"), "1.2.0", "1.1.0", True, ROLLBACK),  # the previous version is kept: roll back to it
    (desired(1, None, "rollback"), "1.2.0", None, True, ROLLBACK),
    (desired(1, None), "1.2.0", None, False, INSTALL),  # no previous folder: None does not mean "as shipped"
    (desired(1, "1.2.0", model="other"), "1.1.0", None, False, INELIGIBLE),
])
def test_decide(want, serving, previous, has_previous, choice):
    assert decide(want, model="detect_detector", serving=serving, previous=previous,
                  has_previous=has_previous) == choice


class ScriptedAgent:
    """The Agent surface DeviceClient uses; install/rollback move semvers like the real one."""

    detector_model, target, device_classes = "detect_detector", "cpu", ("x86-avx2", "x86")

    def __init__(self) -> None:
        self.committed: list[str | None] = [None]
        self.calls: list[tuple] = []
        self.fail_install: Exception | None = None

    def versions(self):
        return {"current": len(self.committed), "previous": len(self.committed) - 1 if len(self.committed) > 1
                else None, "current_model_version": self.committed[-1],
                "previous_model_version": self.committed[-2] if len(self.committed) > 1 else None}

    def status(self):
        return {"busy": None, "target": self.target}

    def install(self, url, *, sha256, size):
        self.calls.append(("install", url, sha256, size))
        if self.fail_install:
            raise self.fail_install
        self.committed.append(url.rsplit("/v", 1)[1].removesuffix(".bundle"))

    def rollback(self, reason):
        self.calls.append(("rollback", reason))
        self.committed.pop()


class NoMetrics:
    def collect(self):
        return Metrics(requests=3, p50_ms=4.0, p99_ms=8.0, error_rate=0.0)

    def recheck_accuracy(self):
        pass


def client_for(bus: FakeBus, agent: ScriptedAgent, tmp_path) -> DeviceClient:
    async def connect(url, name):
        return bus

    return DeviceClient("nats://unused", "dev-1", agent, triton_metrics_url=None, report_s=0.02,
                        state_dir=tmp_path / "fleet", connect=connect, metrics=NoMetrics())


def reports(bus: FakeBus) -> list[Report]:
    return [Report.from_dict(json.loads(r)) for r in bus.reports if isinstance(r, str)]


async def until(condition, deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def run_client(client: DeviceClient, script) -> None:
    async def main():
        client.bus = None
        stop = asyncio.Event()
        task = asyncio.create_task(client.run(stop))
        try:
            await script()
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_registers_installs_rolls_back_and_reports_each(tmp_path):
    bus, agent = FakeBus(), ScriptedAgent()
    client = client_for(bus, agent, tmp_path)

    async def script():
        await until(lambda: "dev-1" in bus.devices.values)
        registration = json.loads(bus.devices.values["dev-1"][0])
        assert registration["device_classes"] == ["x86-avx2", "x86"] and registration["model_version"] is None
        await bus.put_desired("dev-1", desired(1, "1.2.0"))
        await until(lambda: any(r.install_state == "installed" and r.generation == 1 for r in reports(bus)))
        assert agent.calls == [("install", BUNDLE.url, BUNDLE.sha256, BUNDLE.size)]
        installed = next(r for r in reports(bus) if r.install_state == "installed")
        assert installed.model_version == "1.2.0"
        assert json.loads(bus.devices.values["dev-1"][0])["model_version"] == "1.2.0"  # registered again
        await bus.put_desired("dev-1", desired(2, None, "rollback", reason="p99 +80% in canary"))
        await until(lambda: any(r.install_state == "rolled_back" for r in reports(bus)))
        back = next(r for r in reports(bus) if r.install_state == "rolled_back")
        assert (back.model_version, back.generation, back.reason) == (None, 2, "p99 +80% in canary")
        await until(lambda: any(r.interval_s > 0 and r.metrics.p99_ms == 8.0 for r in reports(bus)))

    run_client(client, script)
    assert agent.calls[1] == ("rollback", "p99 +80% in canary")
    seqs = [r.seq for r in reports(bus)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "installing" in [r.install_state for r in reports(bus)]


def test_a_restarted_client_does_not_act_twice_and_keeps_reporting_the_outcome(tmp_path):
    bus, agent = FakeBus(), ScriptedAgent()
    asyncio.run(bus.put_desired("dev-1", desired(5, "1.2.0")))
    run_client(client_for(bus, agent, tmp_path),
               lambda: until(lambda: any(r.install_state == "installed" for r in reports(bus))))
    bus.reports.clear()
    again = client_for(bus, agent, tmp_path)
    run_client(again, lambda: until(lambda: len(reports(bus)) >= 3))
    assert [c[0] for c in agent.calls] == ["install"]
    assert {(r.install_state, r.generation) for r in reports(bus)} == {("installed", 5)}


def test_a_failed_install_is_reported_with_the_agents_error_and_a_later_one_works(tmp_path):
    bus, agent = FakeBus(), ScriptedAgent()
    agent.fail_install = HealthGateError("v2 does not reproduce 1 of 4 expected outputs")
    client = client_for(bus, agent, tmp_path)

    async def script():
        await bus.put_desired("dev-1", desired(1, "1.2.0"))
        await until(lambda: any(r.install_state == "failed" for r in reports(bus)))
        failed = next(r for r in reports(bus) if r.install_state == "failed")
        assert failed.model_version is None and "HealthGateError: v2 does not reproduce" in failed.reason
        agent.fail_install = None
        await bus.put_desired("dev-1", desired(2, "1.3.0"))
        await until(lambda: any(r.install_state == "installed" and r.model_version == "1.3.0" for r in reports(bus)))

    run_client(client, script)


def test_another_models_desired_state_is_ineligible_and_touches_nothing(tmp_path):
    bus, agent = FakeBus(), ScriptedAgent()
    client = client_for(bus, agent, tmp_path)

    async def script():
        await bus.put_desired("dev-1", desired(1, "2.0.0", model="segmenter"))
        await until(lambda: any(r.install_state == "ineligible" for r in reports(bus)))

    run_client(client, script)
    assert agent.calls == []
    assert "segmenter" in next(r for r in reports(bus) if r.install_state == "ineligible").reason
