"""Simulated devices at scale: N devices in one asyncio loop that speak exactly the buckets and subjects of real ones.

make_devices(n, seed, faults, mix) -> [SimDevice]   classes in the mix's exact counts, faults placed by the seed
FleetSimulator(bus, devices, ...)
  start()   every device registers (edgestack_devices), in pipelined chunks
  run(stop) ONE shared wildcard watch of edgestack_desired feeds every device; one scheduler (a heap of due events,
            not a task per device) moves devices along; reports go out on edgestack.report.<id> in concurrent
            chunks, so their JetStream acks are awaited together, not one by one
  step(now) the scheduler itself, without I/O: what is due by `now` -> registrations, reports and garbage to send

A device acts on each desired generation once: install (installing, then installed after a simulated duration,
or failed when its class's update is bad with the "install" effect), rollback (back to the desired version,
rolled_back with the controller's reason). It reports every interval (jittered) and at once after acting.
Faults (fleet.simulate_faults) change that: offline devices never come up, silent ones never report, slow ones
install 10x slower and report every 3rd interval, flapping ones go away and come back as a restart (registration
again, seq from 1, act on the desired state they missed), liars send out-of-range metrics or garbage.

Everything random comes from the seed (one generator per device), so a fleet and each device's choices repeat;
the interleaving with the real controller is as the clock and the network make it. The simulator's own record of
each device (version, state, when it reverted) is the ground truth a test or benchmark checks the controller by.
"""
from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from fleet.errors import FleetError
from fleet.protocol import STREAM_REPORTS, DesiredState, Registration, Report, report_subject
from fleet.simulate_faults import LIES, ClassMix, FaultSpec, MetricModel

log = logging.getLogger("edgestack.fleet.simulate")

SEND_CHUNK = 1000  # messages whose acks are awaited together
REPORT, ACT, DONE, DOWN, UP = "report", "act", "done", "down", "up"


@dataclass
class SimDevice:
    """One simulated device: its identity, fault and random generator, and what it runs now."""
    device_id: str
    device_class: str
    fault: str | None
    rng: random.Random
    model: str = "detect_detector"
    version: str | None = None  # None: the version it shipped with
    install_state: str = "idle"
    generation: int = 0  # of the last desired state it finished acting on
    reason: str | None = None
    seq: int = 0
    up: bool = False
    acting: DesiredState | None = None  # the desired state it is acting on now
    in_stage: set[str] = field(default_factory=set)  # rollouts that asked it to install
    reverted_at: float | None = None  # wall time of its last completed rollback

    def registration(self) -> Registration:
        return Registration(device_id=self.device_id, device_classes=ClassMix.registered_classes(self.device_class),
                            target=ClassMix.target(self.device_class), model=self.model, model_version=self.version,
                            labels={"simulated": "true", "fault": self.fault or "none"})

    @property
    def reachable(self) -> bool:
        """Up now, or flapping (away for a while only); offline devices never are."""
        return self.fault != "offline"


def make_devices(n: int, seed: int, faults: FaultSpec, mix: ClassMix, *, prefix: str = "sim",
                 model: str = "detect_detector") -> list[SimDevice]:
    if n < 1:
        raise FleetError(f"devices must be at least 1, not {n}")
    rng = random.Random(seed)
    classes = [name for name, count in mix.counts(n).items() for _ in range(count)]
    rng.shuffle(classes)
    return [SimDevice(device_id=f"{prefix}-{i:06d}", device_class=device_class, fault=fault, model=model,
                      rng=random.Random(f"{seed}/{prefix}-{i:06d}"))
            for i, (device_class, fault) in enumerate(zip(classes, faults.draw(n, rng)))]


@dataclass
class SimStats:
    registrations: int = 0
    reports: int = 0
    lies: int = 0
    send_errors: int = 0
    desired_seen: int = 0
    installs: int = 0
    install_failures: int = 0
    rollbacks: int = 0
    restarts: int = 0


Outgoing = Registration | Report | tuple[str, bytes]


class FleetSimulator:
    """Many SimDevices over one FleetBus. `clock` (monotonic seconds) and `wall` are injectable for tests."""

    def __init__(self, bus: Any, devices: list[SimDevice], *, interval_s: float = 5.0, install_s: float = 2.0,
                 faults: FaultSpec | None = None, metrics: MetricModel | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        if interval_s <= 0 or install_s < 0:
            raise FleetError(f"interval_s must be > 0 and install_s >= 0, not {interval_s}, {install_s}")
        self.bus, self.devices = bus, devices
        self.by_id = {d.device_id: d for d in devices}
        self.interval_s, self.install_s = interval_s, install_s
        self.faults, self.metrics = faults or FaultSpec(), metrics or MetricModel()
        self.clock, self.wall = clock, wall
        self.latest: dict[str, DesiredState] = {}  # device id -> newest desired state seen on the shared watch
        self.stats = SimStats()
        self._events: list[tuple[float, int, str, str, int]] = []  # (due, tiebreak, kind, device id, generation)
        self._counter = itertools.count()
        self._raw_publish = raw_report_publisher(bus)

    # --- scheduling (no I/O) --------------------------------------------------------------------------------

    def _at(self, due: float, kind: str, device: SimDevice, generation: int = 0) -> None:
        heapq.heappush(self._events, (due, next(self._counter), kind, device.device_id, generation))

    def _report_every(self, device: SimDevice) -> float:
        every = self.interval_s * (self.faults.slow_report_every if device.fault == "slow" else 1)
        return every * device.rng.uniform(0.95, 1.05)

    def schedule_start(self, now: float) -> None:
        """Bring every device but the offline ones up: first reports spread over one interval."""
        for device in self.devices:
            if device.fault == "offline":
                continue
            device.up = True
            self._at(now + device.rng.uniform(0.0, self.interval_s), REPORT, device)
            if device.fault == "flapping":
                self._at(now + self._flap(device, self.faults.flap_up_intervals), DOWN, device)

    def _flap(self, device: SimDevice, mean_intervals: float) -> float:
        return device.rng.expovariate(1.0 / (mean_intervals * self.interval_s))

    def on_desired(self, device_id: str, desired: DesiredState | None, now: float) -> None:
        """A value from the shared watch: remember it, and have the device act on it soon if it is up."""
        device = self.by_id.get(device_id)
        if device is None or desired is None:
            return
        self.stats.desired_seen += 1
        self.latest[device_id] = desired
        if desired.action == "install":
            device.in_stage.add(desired.rollout_id)
        if device.up and desired.generation > device.generation:
            self._at(now + device.rng.uniform(0.0, 0.2), ACT, device, desired.generation)

    def next_due(self) -> float | None:
        return self._events[0][0] if self._events else None

    def step(self, now: float) -> list[Outgoing]:
        """Everything due by `now`, in order: what to send."""
        out: list[Outgoing] = []
        while self._events and self._events[0][0] <= now:
            due, _, kind, device_id, generation = heapq.heappop(self._events)
            device = self.by_id[device_id]
            if kind == UP:
                self._come_up(device, due, out)
            elif not device.up:
                continue  # events of a device that went away die with it
            elif kind == REPORT:
                self._report(device, out)
                self._at(due + self._report_every(device), REPORT, device)
            elif kind == ACT:
                self._act(device, due, out)
            elif kind == DONE:
                self._finish(device, generation, out)
            elif kind == DOWN:
                self._go_down(device, due)
        return out

    # --- device behaviour -----------------------------------------------------------------------------------

    def _act(self, device: SimDevice, now: float, out: list[Outgoing]) -> None:
        desired = self.latest.get(device.device_id)
        if desired is None or desired.generation <= device.generation:
            return
        if device.acting is not None and device.acting.generation >= desired.generation:
            return
        device.acting = desired
        if desired.model != device.model:
            device.generation, device.acting = desired.generation, None
            device.install_state = "failed"
            device.reason = f"desired model {desired.model!r}, this device serves {device.model!r}"
            self._report(device, out)
            return
        base = self.install_s * (self.faults.slow_install_factor if device.fault == "slow" else 1.0)
        if desired.action == "install":
            device.install_state, device.reason = "installing", None
            self._report(device, out)
            self._at(now + base * device.rng.uniform(0.5, 1.5), DONE, device, desired.generation)
        else:
            self._at(now + 0.2 * base * device.rng.uniform(0.5, 1.5), DONE, device, desired.generation)

    def _finish(self, device: SimDevice, generation: int, out: list[Outgoing]) -> None:
        desired = device.acting
        if desired is None or desired.generation != generation:
            return  # superseded by a newer desired state
        device.acting, device.generation = None, generation
        if desired.action == "rollback":
            device.version, device.install_state, device.reason = desired.version, "rolled_back", desired.reason
            device.reverted_at = self.wall()
            self.stats.rollbacks += 1
        elif self.metrics.install_fails(device.device_class):
            device.install_state = "failed"
            device.reason = f"health gate refused {desired.version}: expected outputs differ on 3 of 8 images"
            self.stats.install_failures += 1
        else:
            device.version, device.install_state, device.reason = desired.version, "installed", None
            self.stats.installs += 1
        self._report(device, out)

    def _go_down(self, device: SimDevice, now: float) -> None:
        device.up = False
        if device.acting is not None:  # an interrupted install is undone by the agent's recovery
            device.acting = None
            if device.install_state == "installing":
                device.install_state = "idle"
        self._at(now + self._flap(device, self.faults.flap_down_intervals), UP, device)

    def _come_up(self, device: SimDevice, now: float, out: list[Outgoing]) -> None:
        device.up, device.seq = True, 0
        self.stats.restarts += 1
        out.append(device.registration())
        self._at(now + device.rng.uniform(0.0, 1.0), REPORT, device)
        self._at(now + self._flap(device, self.faults.flap_up_intervals), DOWN, device)
        desired = self.latest.get(device.device_id)
        if desired is not None and desired.generation > device.generation:
            self._at(now + device.rng.uniform(0.0, 0.2), ACT, device, desired.generation)

    def _report(self, device: SimDevice, out: list[Outgoing]) -> None:
        if device.fault == "silent":
            return
        device.seq += 1
        metrics = self.metrics.sample(device.device_class, device.version is not None, self.interval_s, device.rng)
        if device.fault == "liar":
            lie = device.rng.choice(LIES)
            self.stats.lies += 1
            if isinstance(lie, bytes):
                if self._raw_publish is not None:
                    out.append((device.device_id, lie))
                    return
                lie = {"accuracy": -1.0}
            metrics = dataclasses.replace(metrics, **lie)
        acting = device.acting.generation if device.acting is not None else device.generation
        out.append(Report(device_id=device.device_id, seq=device.seq, model_version=device.version,
                          install_state=device.install_state, generation=acting, reason=device.reason,
                          metrics=metrics, interval_s=self.interval_s))

    # --- I/O ------------------------------------------------------------------------------------------------

    async def send(self, items: Iterable[Outgoing]) -> None:
        """Registrations, reports and garbage, SEND_CHUNK at a time with their acks awaited together; a failed
        send is counted, never stops the others."""
        items = list(items)
        for start in range(0, len(items), SEND_CHUNK):
            chunk = items[start:start + SEND_CHUNK]
            reports = [item for item in chunk if isinstance(item, Report)]
            others = [item for item in chunk if not isinstance(item, Report)]
            sends = [self._send_one(item) for item in others]
            batch = getattr(self.bus, "publish_reports", None)
            if batch is not None and reports:
                sends.append(self._send_reports(batch, reports))
            else:
                sends += [self._send_one(report) for report in reports]
            for result in await asyncio.gather(*sends, return_exceptions=True):
                if isinstance(result, BaseException):
                    self.stats.send_errors += 1
                    log.debug("send failed: %s", result)

    async def _send_reports(self, batch: Callable[[list[Report]], Awaitable[None]], reports: list[Report]) -> None:
        self.stats.reports += len(reports)
        await batch(reports)

    def _send_one(self, item: Outgoing) -> Awaitable[None]:
        if isinstance(item, Registration):
            self.stats.registrations += 1
            return self.bus.register(item)
        if isinstance(item, Report):
            self.stats.reports += 1
            return self.bus.publish_report(item)
        device_id, data = item
        return self._raw_publish(report_subject(device_id), data)

    async def start(self) -> None:
        """Register every device (offline ones too: the fleet knew them before they went dark)."""
        await self.send(d.registration() for d in self.devices)
        self.schedule_start(self.clock())

    async def watch(self) -> None:
        """Feed every device from ONE wildcard watch of the desired-state bucket (run() runs it)."""
        async for device_id, desired in self.bus.watch_desired(None):
            self.on_desired(device_id, desired, self.clock())

    async def run(self, stop: asyncio.Event, *, on_tick: Callable[[], None] | None = None,
                  tick_s: float = 0.05) -> None:
        """Until `stop` is set: watch, step and send. `on_tick` is called about every tick (progress output)."""
        watcher = asyncio.create_task(self.watch())
        try:
            while not stop.is_set():
                if watcher.done():
                    watcher.result()  # the watch failed: say why
                    raise FleetError("the desired-state watch ended")
                out = self.step(self.clock())
                if out:
                    await self.send(out)
                if on_tick is not None:
                    on_tick()
                due = self.next_due()
                delay = tick_s if due is None else min(tick_s, max(0.0, due - self.clock()))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    # --- what happened --------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counts of devices by (version, state) among those up now, per rollout its stage devices (reachable,
        rolled back, the last revert's wall time), and the totals; one line of a timeline."""
        up = [d for d in self.devices if d.up]
        by = Counter(f"{d.version or 'shipped'}|{d.install_state}" for d in up)
        stages: dict[str, dict[str, Any]] = {}
        for device in self.devices:
            for rollout_id in device.in_stage:
                stage = stages.setdefault(rollout_id, {"devices": 0, "reachable": 0, "rolled_back": 0,
                                                       "last_reverted_at": None})
                stage["devices"] += 1
                stage["reachable"] += device.reachable
                if device.install_state == "rolled_back" and device.reachable:
                    stage["rolled_back"] += 1
                    stage["last_reverted_at"] = max(stage["last_reverted_at"] or 0.0, device.reverted_at or 0.0)
        return {"wall": round(self.wall(), 3), "up": len(up), "devices": len(self.devices),
                "by_version_state": dict(sorted(by.items())), "stages": stages,
                "stats": dataclasses.asdict(self.stats)}

    def stage_devices(self, rollout_id: str | None = None) -> list[SimDevice]:
        """Devices asked to install by the rollout (by any rollout when None)."""
        return [d for d in self.devices if (rollout_id in d.in_stage if rollout_id else d.in_stage)]

    def unreverted(self, previous_version: str | None, rollout_id: str | None = None) -> list[SimDevice]:
        """Reachable stage devices not (yet) back on `previous_version`."""
        return [d for d in self.stage_devices(rollout_id) if d.reachable and d.version != previous_version]


def raw_report_publisher(bus: Any) -> Callable[[str, bytes], Awaitable[Any]] | None:
    """How to put bytes that are not a report on a report subject (a liar's garbage): the bus's own
    publish_raw_report, or JetStream directly on fleet.transport.NatsFleetBus; None: liars lie in range only."""
    raw = getattr(bus, "publish_raw_report", None)
    if raw is None and getattr(bus, "js", None) is not None:
        return lambda subject, data: bus.js.publish(subject, data, stream=STREAM_REPORTS)
    return raw


def timeline_line(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, separators=(",", ":"))
