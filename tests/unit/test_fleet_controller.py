"""fleet.controller on the in-memory bus: whole rollouts over scripted devices (promotion, per-class rollback,
install failures, inconclusive pause, failure_limit, commands, devices registering mid-rollout) and a controller
that 'crashes' between any two of its bus calls and is replaced by a new one."""
from __future__ import annotations

import asyncio
import json

import pytest

from fleet.controller import Controller
from fleet.protocol import BundleRef, Command, Metrics, Release
from fleet.rollout import Rollout, State, new_rollout
from fleet.strategy import Strategy
from tests.unit.fleet_fakes import Clock, Crash, FakeBus, Fleet, ScriptedDevice

CLASSES = {"x86-avx2": 20, "x86-vnni": 10, "arm64-neon": 6}
GOOD = Metrics(requests=100, p50_ms=20.0, p99_ms=40.0, error_rate=0.5, accuracy=0.95)


def strategy(**analysis) -> Strategy:
    trigger = {"accuracy_drop": 3.0, "latency_increase": 50, "error_rate": 5.0}
    return Strategy.from_dict({
        "stages": [{"name": "canary", "percentage": 10, "duration": "60s", "rollback_trigger": trigger},
                   {"name": "early_access", "percentage": 50, "duration": "60s", "rollback_trigger": trigger},
                   {"name": "general_availability", "percentage": 100, "duration": 0, "rollback_trigger": trigger}],
        "analysis": {"interval": "10s", "failure_limit": 2, "inconclusive": "pause", "min_reporting_devices": 0.8,
                     **analysis}})


def release(classes=tuple(CLASSES)) -> Release:
    return Release(model="detect_detector", version="1.1.0",
                   bundles={c: BundleRef(url=f"http://bundles/{c}.bundle", sha256="ab" * 32, size=1000)
                            for c in classes})


def metrics_of(bad_class: str | None = None, cls: str = ""):
    def metrics(version):
        if version == "1.1.0" and cls == bad_class:
            return Metrics(requests=100, p50_ms=21.0, p99_ms=42.0, error_rate=0.5, accuracy=0.80)
        return GOOD
    return metrics


def make_devices(bad_class: str | None = None, extra: list[ScriptedDevice] = ()) -> list[ScriptedDevice]:
    devices = [ScriptedDevice(f"{cls}-{i:03d}", (cls, "cpu"), metrics=metrics_of(bad_class, cls))
               for cls, n in CLASSES.items() for i in range(n)]
    return devices + list(extra)


class Harness:
    def __init__(self, devices, strat: Strategy | None = None, rel: Release | None = None):
        self.bus, self.clock, self.logged = FakeBus(), Clock(), []
        self.fleet = Fleet(self.bus, devices)
        self.strategy, self.release = strat or strategy(), rel or release()
        self.controller = self.new_controller()

    def new_controller(self) -> Controller:
        return Controller(self.bus, clock=self.clock, log=self.logged.append, registration_refresh_s=5)

    async def start(self, rollout_id: str = "r1") -> None:
        await self.fleet.register()
        await self.fleet.step()  # every device reports once before the rollout: the baselines
        record = new_rollout(rollout_id, self.release, self.strategy, self.clock())
        await self.bus.save_rollout(rollout_id, record.to_dict(), 0)

    async def record(self, rollout_id: str = "r1") -> Rollout:
        data, _ = await self.bus.load_rollout(rollout_id)
        return Rollout.from_dict(data)

    async def drive(self, until, steps: int = 200, step_s: float = 5.0) -> Rollout:
        for _ in range(steps):
            await self.controller.tick()
            await self.fleet.step()
            self.clock.advance(step_s)
            record = await self.record()
            if until(record):
                return record
        pytest.fail(f"rollout did not get there in {steps} steps: {record.state} stage {record.stage}, "
                    f"events {[e['reason'] for e in record.events[-5:]]}")

    async def command(self, name: str, reason: str | None = None) -> None:
        current = await self.bus.get_command("r1")
        await self.bus.put_command("r1", Command(command=name, seq=(current.seq if current else 0) + 1,
                                                 reason=reason))


def run(coro):
    return asyncio.run(coro)


def test_a_rollout_goes_through_every_stage_and_every_class_is_in_the_canary():
    jetson = ScriptedDevice("jetson-001", ("jetson-orin",))
    h = Harness(make_devices(extra=[jetson]))

    async def scenario():
        await h.start()
        seen_stages = []

        def done(r):
            seen_stages.append((r.stage, {r.classes[d] for d, a in r.assignments.items() if a.stage == 0}))
            return r.terminal
        record = await h.drive(done)
        assert record.state is State.COMPLETED
        canary_classes = next(classes for stage, classes in seen_stages if stage == 0 and classes)
        assert canary_classes == set(CLASSES)
        assert {d.version for d in h.fleet.devices.values() if d.device_id != "jetson-001"} == {"1.1.0"}
        assert jetson.version == "1.0.0" and jetson.generation == 0 and "jetson-001" in record.ineligible
        assert [a["verdict"] for a in record.analyses if a["stage"] == 2][-1] == "pass"
        events = [e["event"] for e in h.logged]
        assert events.count("stage_started") == 3 and all(json.dumps(e) for e in h.logged)
    run(scenario())


def test_a_model_bad_on_one_class_rolls_the_stage_back_and_says_why():
    h = Harness(make_devices(bad_class="arm64-neon"))

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.ROLLED_BACK and record.stage == 0
        revert = record.revert
        assert "accuracy_drop" in revert["reason"] and "arm64-neon" in revert["reason"]
        assert {f["scope"] for f in revert["failures"]} == {"arm64-neon"}  # the other classes and "*" were fine
        assert revert["seconds"] is not None and revert["unconfirmed"] == []
        assert {d.version for d in h.fleet.devices.values()} == {"1.0.0"}
        reverted = [d for d in h.fleet.devices.values() if d.state == "rolled_back"]
        assert len(reverted) == len(record.assignments) > 0
    run(scenario())


def test_devices_whose_agent_refuses_the_update_trip_install_failures():
    devices = make_devices()
    for device in devices:
        if device.classes[0] == "x86-vnni":
            device.behaviour = "refuse"
    h = Harness(devices)

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.ROLLED_BACK
        assert {(f["trigger"], f["scope"]) for f in record.revert["failures"]} >= {("install_failures", "x86-vnni")}
        assert "install_failures on class x86-vnni" in record.revert["reason"]
        assert "health gate: fidelity 0.41 below 0.9" in record.revert["reason"], "the device's own reason is kept"
    run(scenario())


def test_silent_devices_make_the_round_inconclusive_and_pause_until_resumed():
    devices = make_devices()
    for device in devices[:30]:
        device.behaviour = "silent"
    h = Harness(devices)

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.state is State.PAUSED)
        last = record.analyses[-1]
        assert last["verdict"] == "inconclusive" and last["counts"]["silent"] + last["counts"]["stale"] > 0
        for device in devices[:30]:
            device.behaviour = "ok"
        await h.command("resume", "devices are back")
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.COMPLETED
        assert any(e["event"] == "command" and e["reason"] == "devices are back" for e in record.events)
    run(scenario())


def test_lying_devices_are_counted_and_excluded():
    devices = make_devices()
    devices[0].behaviour = "lie"  # x86-avx2-000: out-of-range metrics
    h = Harness(devices, strategy(min_reporting_devices=0.5))

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.COMPLETED
        assert max(a["counts"]["lying"] for a in record.analyses) == 1
    run(scenario())


def test_one_failed_round_below_failure_limit_does_not_roll_back():
    flaky = {"bad": False}

    def metrics(version):
        return Metrics(requests=100, p50_ms=20, p99_ms=400 if flaky["bad"] and version == "1.1.0" else 40,
                       error_rate=0.5, accuracy=0.95)
    devices = [ScriptedDevice(f"d{i:03d}", ("x86-avx2",), metrics=metrics) for i in range(20)]
    h = Harness(devices)

    async def scenario():
        await h.start()
        await h.drive(lambda r: r.stage_started_at is not None)
        flaky["bad"] = True
        record = await h.drive(lambda r: any(a["verdict"] == "fail" for a in r.analyses), step_s=2)
        flaky["bad"] = False
        assert record.consecutive_failures == 1 and record.state is State.RUNNING
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.COMPLETED
    run(scenario())


def test_without_auto_promote_a_passed_stage_waits_for_promote():
    strat = Strategy.from_dict({**strategy().to_dict(), "auto_promote": False})
    h = Harness(make_devices(), strat)

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.state is State.WAITING_PROMOTION)
        assert record.stage == 0
        await h.command("promote")
        record = await h.drive(lambda r: r.stage == 1 and r.state is State.RUNNING)
        assert any(a.stage == 1 for a in record.assignments.values())
    run(scenario())


def test_abort_reverts_every_updated_device():
    h = Harness(make_devices())

    async def scenario():
        await h.start()
        await h.drive(lambda r: r.stage == 1)
        await h.command("abort", "wrong model")
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.ABORTED and record.revert["reason"] == "wrong model"
        assert {d.version for d in h.fleet.devices.values()} == {"1.0.0"}
    run(scenario())


def test_a_command_the_state_does_not_accept_is_refused_and_recorded():
    h = Harness(make_devices())

    async def scenario():
        await h.start()
        await h.drive(lambda r: r.state is State.RUNNING)
        await h.command("resume")
        record = await h.drive(lambda r: r.command_seq == 1)
        refused = [e for e in record.events if e["event"] == "command_refused"]
        assert refused and "cannot resume a rollout that is RUNNING" in refused[0]["reason"]
        assert record.state is State.RUNNING
    run(scenario())


def test_a_device_registering_mid_rollout_gets_its_place():
    late = ScriptedDevice("x86-avx2-late", ("x86-avx2",))
    h = Harness(make_devices())

    async def scenario():
        await h.start()
        await h.drive(lambda r: r.stage == 2)
        h.fleet.devices[late.device_id] = late
        await h.bus.register(late.registration())
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.COMPLETED and late.version == "1.1.0"
        assert record.assignments["x86-avx2-late"].stage == 2
    run(scenario())


@pytest.mark.parametrize("method,calls", [("save_rollout", n) for n in range(1, 12)] +
                         [("put_desired_many", n) for n in range(1, 4)] + [("fetch_reports", 7)])
def test_a_controller_that_dies_between_any_two_steps_is_resumed_by_the_next(method, calls):
    h = Harness(make_devices())
    acted: list[tuple[str, int]] = []
    for device in h.fleet.devices.values():
        original = device.act

        def act(desired, device=device, original=original):
            if desired is not None and desired.generation > device.generation:
                acted.append((device.device_id, desired.generation))
            original(desired)
        device.act = act

    async def scenario():
        await h.start()
        h.bus.crash_after(calls, method)
        with pytest.raises(Crash):
            await h.drive(lambda r: r.terminal)
        h.controller = h.new_controller()
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.COMPLETED
        assert len(acted) == len(set(acted)) == len(h.fleet.devices)  # each device installed once
        assert {d.version for d in h.fleet.devices.values()} == {"1.1.0"}
    run(scenario())


def test_a_device_silent_during_the_rollback_does_not_hold_it_forever_and_is_listed():
    h = Harness(make_devices(bad_class="arm64-neon"))

    async def scenario():
        await h.start()
        record = await h.drive(lambda r: r.stage_started_at is not None)
        gone = h.fleet.devices[sorted(record.assignments)[0]]
        install = gone.act

        def offline_when_the_rollback_comes(desired):
            if desired is not None and desired.action == "rollback":
                gone.behaviour = "silent"
            else:
                install(desired)
        gone.act = offline_when_the_rollback_comes
        record = await h.drive(lambda r: r.terminal)
        assert record.state is State.ROLLED_BACK and record.revert["unconfirmed"] == [gone.device_id]
        assert gone.version == "1.1.0" and (await h.bus.get_desired(gone.device_id)).action == "rollback"
        assert "1 silent (unconfirmed)" in record.events[-1]["reason"]
    run(scenario())


def test_a_stage_waits_for_its_devices_to_run_the_new_version_before_its_duration_counts():
    h = Harness(make_devices(), strategy(inconclusive="continue"))

    async def scenario():
        await h.start()
        for _ in range(40):  # 200 s, far past the canary's 60 s, while no device acts on its desired state
            await h.controller.tick()
            h.clock.advance(5.0)
        record = await h.record()
        assert record.state is State.RUNNING and record.stage == 0 and record.stage_deployed_at is None
        record = await h.drive(lambda r: r.stage == 1)
        deployed = next(e for e in record.events if e["event"] == "stage_deployed")
        passed = next(e for e in record.events if e["event"] == "stage_passed")
        assert passed["time"] - deployed["time"] >= 60
    run(scenario())
