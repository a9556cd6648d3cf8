"""Unit tests of the fleet simulator: the fault model, class mix and metrics (fleet.simulate_faults), and device
behaviour driven by a fake clock through FleetSimulator.step, plus one run over an in-memory bus."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import pytest

from fleet.errors import ProtocolError
from fleet.protocol import BundleRef, DesiredState, Registration, Release, Report
from fleet.simulate import FleetSimulator, make_devices
from fleet.simulate_faults import BadClass, ClassMix, FaultSpec, FaultSpecError, MetricModel

BUNDLE = BundleRef(url="http://registry/b.bundle", sha256="ab" * 32, size=1000)
INTERVAL = 5.0
INSTALL = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def install(generation: int = 1, version: str = "1.1.0") -> DesiredState:
    return DesiredState(rollout_id="r1", model="detect_detector", version=version, action="install",
                        generation=generation, bundle=BUNDLE)


def rollback(generation: int) -> DesiredState:
    return DesiredState(rollout_id="r1", model="detect_detector", version=None, action="rollback",
                        generation=generation, reason="canary: accuracy dropped on cuda-sm87")


def simulator(faults: dict[str, float] | None = None, n: int = 1, *, bad: BadClass | None = None,
              mix: str = "x86-vnni=1", raw: bool = False) -> tuple[FleetSimulator, Clock]:
    spec = FaultSpec(dict(faults or {}))
    clock = Clock()
    bus = type("RawBus", (), {"publish_raw_report": lambda self, subject, data: None})() if raw else object()
    sim = FleetSimulator(bus, make_devices(n, 3, spec, ClassMix.parse(mix)), interval_s=INTERVAL, install_s=INSTALL,
                         faults=spec, metrics=MetricModel(bad=bad), clock=clock, wall=clock)
    sim.schedule_start(0.0)
    return sim, clock


def run_until(sim: FleetSimulator, clock: Clock, until: float, step: float = 0.1) -> list:
    out = []
    while clock.now < until:
        clock.now = round(clock.now + step, 6)
        out += sim.step(clock.now)
    return out


def reports(out: list) -> list[Report]:
    return [item for item in out if isinstance(item, Report)]


def test_parse_errors_name_the_field():
    with pytest.raises(FaultSpecError, match="unknown name 'lag'"):
        FaultSpec.parse("lag=0.1")
    with pytest.raises(FaultSpecError, match="slow = 1.5 is not a fraction"):
        FaultSpec.parse("slow=1.5")
    with pytest.raises(FaultSpecError, match="offline = 'x' is not a number"):
        FaultSpec.parse("offline=x")
    with pytest.raises(FaultSpecError, match="add up to 1.2"):
        FaultSpec.parse("slow=0.6,liar=0.6")
    with pytest.raises(FaultSpecError, match="class mix.*x86-zen"):
        ClassMix.parse("x86-zen=0.5")
    with pytest.raises(FaultSpecError, match="effect 'slowness' unknown"):
        BadClass.parse("cuda-sm87:slowness")
    with pytest.raises(FaultSpecError, match="accuracy amount '2' does not fit"):
        BadClass.parse("cuda-sm87:accuracy=2")
    assert BadClass.parse("cuda-sm87") == BadClass("cuda-sm87", "accuracy")
    assert BadClass.parse("cuda-sm87:accuracy=0.02").effect_amount() == 0.02
    assert FaultSpec.parse("none").shares == {}
    assert set(FaultSpec.parse("default").shares) == {"offline", "slow", "flapping", "silent", "liar"}


def test_fleet_is_deterministic_with_exact_shares():
    faults, mix = FaultSpec.parse("offline=0.02,slow=0.05,liar=0.01"), ClassMix.parse()
    first, again = make_devices(1000, 7, faults, mix), make_devices(1000, 7, faults, mix)
    assert [(d.device_id, d.device_class, d.fault) for d in first] == \
        [(d.device_id, d.device_class, d.fault) for d in again]
    assert [d.device_class for d in make_devices(1000, 8, faults, mix)] != [d.device_class for d in first]
    assert Counter(d.device_class for d in first) == {"x86-vnni": 400, "x86-avx2": 300, "arm64-neon": 200,
                                                      "cuda-sm87": 100}
    assert Counter(d.fault for d in first) == {None: 920, "slow": 50, "offline": 20, "liar": 10}
    jetson = next(d for d in first if d.device_class == "cuda-sm87").registration()
    assert jetson.device_classes == ("cuda-sm87", "arm64-dotprod") and jetson.target == "jetson"
    assert Registration.from_dict(json.loads(json.dumps(jetson.to_dict()))) == jetson


def test_mix_counts_add_up():
    assert sum(ClassMix.parse("x86-vnni=1,x86-avx2=1,arm64-neon=1").counts(10).values()) == 10


def test_healthy_device_reports_every_interval_with_valid_metrics():
    sim, clock = simulator()
    sent = reports(run_until(sim, clock, 10 * INTERVAL))
    assert 9 <= len(sent) <= 11
    assert [r.seq for r in sent] == list(range(1, len(sent) + 1))
    for report in sent:  # what the controller parses back
        assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report
        assert report.install_state == "idle" and report.model_version is None


def test_offline_and_silent_never_report_slow_reports_a_third():
    sim, clock = simulator({"offline": 0.25, "silent": 0.25, "slow": 0.25}, n=4)
    out = reports(run_until(sim, clock, 30 * INTERVAL))
    by_fault = Counter(sim.by_id[r.device_id].fault for r in out)
    assert by_fault["offline"] == 0 and by_fault["silent"] == 0
    assert 25 <= by_fault[None] <= 32 and 8 <= by_fault["slow"] <= 11


def test_install_then_rollback_each_generation_once():
    sim, clock = simulator()
    device = sim.devices[0]
    run_until(sim, clock, 1.0)
    sim.on_desired(device.device_id, install(), clock.now)
    sim.on_desired(device.device_id, install(), clock.now)  # the same generation again: acted on once
    out = reports(run_until(sim, clock, 1.5))
    assert [(r.install_state, r.generation) for r in out] == [("installing", 1)]
    out = reports(run_until(sim, clock, 1.0 + 0.2 + 1.5 * INSTALL + 0.1))
    assert ("installed", "1.1.0", 1) in [(r.install_state, r.model_version, r.generation) for r in out]
    assert device.version == "1.1.0" and sim.stats.installs == 1
    sim.on_desired(device.device_id, rollback(2), clock.now)
    out = reports(run_until(sim, clock, clock.now + 2.0))
    last = out[-1]
    assert (last.install_state, last.model_version, last.generation) == ("rolled_back", None, 2)
    assert "cuda-sm87" in last.reason and device.reverted_at is not None
    assert sim.unreverted(None, "r1") == [] and sim.stage_devices("r1") == [device]


def test_newer_generation_supersedes_an_install_in_progress():
    sim, clock = simulator({"slow": 1.0})  # 10x install: 20 s
    device = sim.devices[0]
    sim.on_desired(device.device_id, install(), clock.now)
    run_until(sim, clock, 3.0)
    assert device.install_state == "installing"
    sim.on_desired(device.device_id, rollback(2), clock.now)
    run_until(sim, clock, 60.0)
    assert (device.version, device.install_state, device.generation) == (None, "rolled_back", 2)
    assert sim.stats.installs == 0


def test_bad_class_install_effect_fails_the_install():
    sim, clock = simulator(bad=BadClass("x86-vnni", "install"))
    sim.on_desired(sim.devices[0].device_id, install(), clock.now)
    out = reports(run_until(sim, clock, 10.0))
    failed = [r for r in out if r.install_state == "failed"]
    assert failed and failed[0].model_version is None and "health gate" in failed[0].reason


@pytest.mark.parametrize("effect, field, worse", [("accuracy", "accuracy", lambda bad, good: bad < good - 0.05),
                                                  ("latency", "p50_ms", lambda bad, good: bad > 1.5 * good),
                                                  ("errors", "error_rate", lambda bad, good: bad > good + 5)])
def test_bad_class_metrics_worse_only_on_that_class_after_update(effect, field, worse):
    model = MetricModel(bad=BadClass("cuda-sm87", effect))

    def mean(device_class: str, updated: bool) -> float:
        rng = random.Random(1)
        return sum(getattr(model.sample(device_class, updated, 5.0, rng), field) for _ in range(200)) / 200

    assert worse(mean("cuda-sm87", True), mean("cuda-sm87", False))
    assert not worse(mean("x86-vnni", True), mean("x86-vnni", False))


def test_liar_reports_do_not_parse():
    sim, clock = simulator({"liar": 1.0}, raw=True)
    out = run_until(sim, clock, 20 * INTERVAL)
    assert len(out) >= 15 and sim.stats.lies == len(out)
    for item in out:
        if isinstance(item, Report):
            with pytest.raises(ProtocolError, match="metrics"):
                Report.from_dict(json.loads(json.dumps(item.to_dict())))
        else:
            device_id, data = item
            with pytest.raises((ValueError, ProtocolError)):
                Report.from_dict(json.loads(data))


def test_flapping_device_restarts_and_acts_on_what_it_missed():
    sim, clock = simulator({"flapping": 1.0})
    device = sim.devices[0]
    while device.up:
        clock.now += 0.5
        sim.step(clock.now)
    sim.on_desired(device.device_id, install(), clock.now)  # arrives while it is away
    assert device.generation == 0
    out = []
    while not device.up:
        clock.now += 0.5
        out += sim.step(clock.now)
    out += run_until(sim, clock, clock.now + 1.5 * INSTALL + 1.5)
    assert isinstance(out[0], Registration)
    assert reports(out)[0].seq == 1 and device.version == "1.1.0" and sim.stats.restarts == 1


class MemoryBus:
    """The part of FleetBus the simulator uses, in memory."""

    def __init__(self) -> None:
        self.registered: dict[str, Registration] = {}
        self.reports: list[Report] = []
        self.changes: asyncio.Queue = asyncio.Queue()

    async def register(self, registration: Registration) -> None:
        self.registered[registration.device_id] = registration

    async def publish_report(self, report: Report) -> None:
        await asyncio.sleep(0)
        self.reports.append(report)

    async def put_desired(self, device_id: str, desired: DesiredState) -> None:
        await self.changes.put((device_id, desired))

    async def watch_desired(self, device_id=None):
        while True:
            yield await self.changes.get()


def test_run_over_a_bus_registers_reports_and_installs():
    async def scenario() -> tuple[MemoryBus, FleetSimulator]:
        bus = MemoryBus()
        devices = make_devices(50, 1, FaultSpec.parse("offline=0.1"), ClassMix.parse())
        sim = FleetSimulator(bus, devices, interval_s=0.2, install_s=0.05)
        await sim.start()
        stop = asyncio.Event()
        task = asyncio.create_task(sim.run(stop))
        for device in devices:
            await bus.put_desired(device.device_id, install())
        deadline = asyncio.get_running_loop().time() + 10
        while sum(d.version == "1.1.0" for d in devices) < 45 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return bus, sim

    bus, sim = asyncio.run(scenario())
    assert len(bus.registered) == 50
    assert {r.device_id for r in bus.reports} == {d.device_id for d in sim.devices if d.fault != "offline"}
    assert sum(d.version == "1.1.0" for d in sim.devices) == 45
    assert all(d.version is None for d in sim.devices if d.fault == "offline")
    assert sim.snapshot()["by_version_state"] == {"1.1.0|installed": 45}


def test_controller_rolls_back_the_bad_class_on_the_fake_bus():
    """The real controller and 200 simulated devices with faults on the in-memory bus, one fake clock: the
    canary of a release bad on cuda-sm87 is rolled back, the reason names the class, every reachable canary
    device is back on the version it shipped with and no other device moved."""
    from fleet.controller import Controller
    from fleet.rollout import new_rollout
    from fleet.strategy import Strategy
    from tests.unit.fleet_fakes import Clock as EpochClock
    from tests.unit.fleet_fakes import FakeBus

    strategy = Strategy.from_dict({
        "stages": [{"name": "canary", "percentage": 10, "duration": "60s",
                    "rollback_trigger": {"accuracy_drop": 3.0}},
                   {"name": "general_availability", "percentage": 100, "duration": "0s"}],
        "analysis": {"interval": "5s", "failure_limit": 2, "inconclusive": "continue",
                     "min_reporting_devices": 0.5, "max_device_staleness": "15s"}})
    classes = ("x86-vnni", "x86-avx2", "arm64-neon", "cuda-sm87")
    release = Release(model="detect_detector", version="1.1.0",
                      bundles={c: BundleRef(url=f"http://r/{c}", sha256=f"{i + 1}" * 64, size=10)
                               for i, c in enumerate(classes)})

    async def scenario():
        clock, bus = EpochClock(), FakeBus()
        faults = FaultSpec.parse("offline=0.03,slow=0.03,flapping=0.03,silent=0.02")
        sim = FleetSimulator(bus, make_devices(200, 5, faults, ClassMix.parse()), interval_s=5.0, install_s=2.0,
                             faults=faults, metrics=MetricModel(bad=BadClass("cuda-sm87", "accuracy", 0.1)),
                             clock=clock, wall=clock)
        controller = Controller(bus, clock=clock, log=lambda entry: None)
        await sim.start()
        watcher = asyncio.create_task(sim.watch())

        async def advance(seconds: float) -> None:
            for _ in range(int(seconds / 0.5)):
                clock.advance(0.5)
                await sim.send(sim.step(clock()))
                await asyncio.sleep(0)  # the watch hands new desired states to the devices
                await controller.tick()

        await advance(12)
        rollout = new_rollout("r-bad", release, strategy, clock())
        await bus.save_rollout(rollout.id, rollout.to_dict(), 0)
        for _ in range(240):
            await advance(0.5)
            record = (await bus.load_rollout(rollout.id))[0]
            if record["state"] == "ROLLED_BACK" and not sim.unreverted(None, rollout.id):
                break
        watcher.cancel()
        return record, sim

    record, sim = asyncio.run(scenario())
    assert record["state"] == "ROLLED_BACK", record["events"][-3:]
    assert "cuda-sm87" in record["revert"]["reason"] and record["stage"] == 0
    canary = sim.stage_devices("r-bad")
    assert {d.device_class for d in canary} == set(classes)
    assert all(d.version is None for d in canary if d.reachable)
    assert all(d.version is None for d in sim.devices)
    assert all(d.install_state in ("idle", "rolled_back") for d in sim.devices if d.up)
