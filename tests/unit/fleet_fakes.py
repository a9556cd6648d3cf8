"""Test doubles for the fleet's unit tests: an in-memory FleetBus with the semantics of NATS JetStream key-value
buckets (one revision sequence per bucket, compare-and-set, watches that see the current value then every change)
and of the report stream (a queue the controller's consumer drains), a settable clock, and scripted devices."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

from fleet.errors import ConflictError, ProtocolError
from fleet.protocol import (COMMAND_KEY_PREFIX, Command, DesiredState, InvalidReport, Metrics, Registration, Report,
                            check_token)


class Crash(Exception):
    """Raised by FakeBus.crash_after: the controller 'dies' between two of its bus calls."""


class _Bucket:
    def __init__(self) -> None:
        self.values: dict[str, tuple[str, int]] = {}  # key -> (JSON text, revision)
        self.sequence = 0
        self.watchers: list[tuple[str | None, asyncio.Queue]] = []

    def put(self, key: str, value: str | None) -> int:
        self.sequence += 1
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = (value, self.sequence)
        for wanted, queue in self.watchers:
            if wanted is None or wanted == key:
                queue.put_nowait((key, value))
        return self.sequence


class FakeBus:
    """fleet.protocol.FleetBus in memory. Documents are stored as JSON text, as on the wire, so a test sees what
    would really be sent. crash_after(n, method) makes the n-th next call of `method` raise Crash before it acts."""

    def __init__(self) -> None:
        self.desired, self.devices, self.rollouts = _Bucket(), _Bucket(), _Bucket()
        self.reports: list[str | tuple[str, str]] = []  # JSON text, or (device_id, raw text that may not parse)
        self.calls: dict[str, int] = {}
        self._crash: dict[str, int] = {}
        self.closed = False

    def crash_after(self, calls: int, method: str) -> None:
        self._crash[method] = calls

    def _call(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method in self._crash:
            self._crash[method] -= 1
            if self._crash[method] <= 0:
                del self._crash[method]
                raise Crash(f"crash before {method}")

    async def put_desired(self, device_id: str, desired: DesiredState) -> None:
        self._call("put_desired")
        self.desired.put(check_token(device_id, "device_id"), json.dumps(desired.to_dict()))

    async def put_desired_many(self, items: Mapping[str, DesiredState]) -> None:
        self._call("put_desired_many")
        for device_id, desired in items.items():
            self.desired.put(check_token(device_id, "device_id"), json.dumps(desired.to_dict()))

    async def get_desired(self, device_id: str) -> DesiredState | None:
        entry = self.desired.values.get(device_id)
        return DesiredState.from_dict(json.loads(entry[0])) if entry else None

    async def watch_desired(self, device_id: str | None = None) -> AsyncIterator[tuple[str, DesiredState | None]]:
        queue: asyncio.Queue = asyncio.Queue()
        for key, (value, _) in sorted(self.desired.values.items()):
            if device_id is None or key == device_id:
                queue.put_nowait((key, value))
        watcher = (device_id, queue)
        self.desired.watchers.append(watcher)
        try:
            while True:
                key, value = await queue.get()
                yield key, None if value is None else DesiredState.from_dict(json.loads(value))
        finally:
            self.desired.watchers.remove(watcher)

    async def register(self, registration: Registration) -> None:
        self.devices.put(registration.device_id, json.dumps(registration.to_dict()))

    async def registrations(self) -> dict[str, Registration]:
        self._call("registrations")
        out = {}
        for key, (value, _) in self.devices.values.items():
            try:
                out[key] = Registration.from_dict(json.loads(value))
            except (ProtocolError, ValueError):
                continue
        return out

    async def publish_report(self, report: Report) -> None:
        self.reports.append(json.dumps(report.to_dict()))

    def publish_raw(self, device_id: str, text: str) -> None:
        """A message on a device's report subject as raw text: what a lying or broken device sends."""
        self.reports.append((device_id, text))

    async def fetch_reports(self, max_messages: int = 10_000,
                            timeout_s: float = 0.5) -> list[Report | InvalidReport]:
        self._call("fetch_reports")
        batch, self.reports = self.reports[:max_messages], self.reports[max_messages:]
        out: list[Report | InvalidReport] = []
        for item in batch:
            device_id, text = item if isinstance(item, tuple) else (None, item)
            try:
                out.append(Report.from_dict(json.loads(text)))
            except (ProtocolError, ValueError) as exc:
                out.append(InvalidReport(device_id=device_id or "unknown", error=str(exc)))
        return out

    async def load_rollout(self, rollout_id: str) -> tuple[dict[str, Any] | None, int]:
        self._call("load_rollout")
        entry = self.rollouts.values.get(rollout_id)
        return (json.loads(entry[0]), entry[1]) if entry else (None, 0)

    async def save_rollout(self, rollout_id: str, record: Mapping[str, Any], revision: int) -> int:
        self._call("save_rollout")
        current = self.rollouts.values.get(check_token(rollout_id, "rollout_id"))
        if (current[1] if current else 0) != revision:
            raise ConflictError(f"rollout {rollout_id} is at revision {current[1] if current else 0}, "
                                f"not {revision}")
        return self.rollouts.put(rollout_id, json.dumps(record, separators=(",", ":")))

    async def list_rollouts(self) -> list[str]:
        return sorted(k for k in self.rollouts.values if not k.startswith(COMMAND_KEY_PREFIX))

    async def put_command(self, rollout_id: str, command: Command) -> None:
        self.rollouts.put(COMMAND_KEY_PREFIX + check_token(rollout_id, "rollout_id"), json.dumps(command.to_dict()))

    async def get_command(self, rollout_id: str) -> Command | None:
        entry = self.rollouts.values.get(COMMAND_KEY_PREFIX + rollout_id)
        return Command.from_dict(json.loads(entry[0])) if entry else None

    async def close(self) -> None:
        self.closed = True

    def record_size(self, rollout_id: str) -> int:
        return len(self.rollouts.values[rollout_id][0].encode())


class Clock:
    """A clock the test moves: seconds since the epoch."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ScriptedDevice:
    """A device that acts on its desired state at once: installs (or fails, per `behaviour`), rolls back, and
    reports metrics from `metrics(version)`."""
    device_id: str
    classes: tuple[str, ...]
    version: str | None = "1.0.0"
    model: str = "detect_detector"
    behaviour: str = "ok"  # ok | refuse (agent refuses the install) | silent (never reports) | lie
    metrics: Callable[[str | None], Metrics] = field(default=lambda version: Metrics(
        requests=100, p50_ms=20.0, p99_ms=40.0, error_rate=0.0, accuracy=0.95))
    generation: int = 0
    state: str = "idle"
    seq: int = 0
    reason: str | None = None
    original: str | None = None

    def registration(self) -> Registration:
        return Registration(device_id=self.device_id, device_classes=self.classes, target="cpu", model=self.model,
                            model_version=self.version)

    def act(self, desired: DesiredState | None) -> None:
        if desired is None or desired.generation <= self.generation:
            return
        self.generation = desired.generation
        if self.original is None:
            self.original = self.version
        if desired.action == "rollback":
            self.version, self.state, self.reason = desired.version, "rolled_back", desired.reason
        elif self.behaviour == "refuse":
            self.state, self.reason = "failed", "health gate: fidelity 0.41 below 0.9"
        else:
            self.version, self.state, self.reason = desired.version, "installed", None

    def report(self) -> Report | None:
        if self.behaviour == "silent":
            return None
        self.seq += 1
        return Report(device_id=self.device_id, seq=self.seq, model_version=self.version, install_state=self.state,
                      generation=self.generation, reason=self.reason, metrics=self.metrics(self.version),
                      interval_s=60.0)


class Fleet:
    """Scripted devices on a FakeBus: `await fleet.step()` acts on every desired state and sends one report each."""

    def __init__(self, bus: FakeBus, devices: list[ScriptedDevice]):
        self.bus = bus
        self.devices = {d.device_id: d for d in devices}

    async def register(self) -> None:
        for device in self.devices.values():
            await self.bus.register(device.registration())

    async def step(self) -> None:
        for device_id, device in self.devices.items():
            device.act(await self.bus.get_desired(device_id))
            if device.behaviour == "lie":
                self.bus.publish_raw(device_id, json.dumps({"device_id": device_id, "seq": 1,
                                                            "install_state": "installed",
                                                            "metrics": {"requests": 5, "p99_ms": -3}}))
                continue
            report = device.report()
            if report is not None:
                await self.bus.publish_report(report)
