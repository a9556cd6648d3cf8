"""The device side of the fleet: beside the sidecar's Agent, register, watch this device's desired state, act
on it with the agent, and report every interval.

    client = DeviceClient("nats://fleet:4222", "cam-017", agent, triton_metrics_url="127.0.0.1:8002",
                          ensemble_model="detect", report_s=10, state_dir=Path("state/fleet"))
    runner = client.start_thread()       # its own asyncio loop in a thread (the sidecar daemon's way)
    ...
    runner.stop()

For each desired state not acted on yet (the last acted (rollout_id, generation) is kept in
<state_dir>/device_client.json, so a restart does not act twice), decide() picks one of:
  nothing    the agent already serves desired.version           -> report installed
  rollback   action rollback, or the agent's previous committed version is desired.version
             -> agent.rollback(reason)                          -> report rolled_back (with the reason)
  install    agent.install(bundle.url, sha256=, size=)          -> report installed, or failed with the agent's
             error (the agent has rolled itself back; its signatures and gate decide, no new trust path)
  ineligible a desired state for another model                  -> report ineligible
A report goes out at once after acting and every report_s (fleet.device_metrics: latency, errors, accuracy,
power). The desired key is watched, and read again every interval in case a watch missed a change. NATS being
down never touches serving: the agent and Triton do not depend on it; reports resume after the reconnect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from fleet.device_metrics import DeviceMetrics
from fleet.errors import FleetError, TransportError
from fleet.protocol import DesiredState, Metrics, Registration, Report, check_token
from sidecar.durable import atomic_write

log = logging.getLogger("fleet.device")

NOTHING, ROLLBACK, INSTALL, INELIGIBLE = "nothing", "rollback", "install", "ineligible"


def decide(desired: DesiredState, *, model: str, serving: str | None, previous: str | None,
           has_previous: bool) -> str:
    """What to do about `desired` for a device whose agent serves semver `serving` (None: as shipped) and keeps
    a previous committed version (`has_previous`) with semver `previous`."""
    if desired.model != model:
        return INELIGIBLE
    if desired.version == serving:
        return NOTHING
    if desired.action == "rollback" or (has_previous and previous == desired.version):
        return ROLLBACK
    return INSTALL


@dataclass
class Outcome:
    """What the device last did about a desired state; reported until the next one."""
    rollout_id: str | None = None
    generation: int = 0
    install_state: str = "idle"
    reason: str | None = None

    def acted_on(self, desired: DesiredState) -> bool:
        return (self.rollout_id, self.generation) == (desired.rollout_id, desired.generation)


class OutcomeStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> Outcome:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return Outcome(data.get("rollout_id"), int(data.get("generation", 0)), data.get("install_state", "idle"),
                           data.get("reason"))
        except FileNotFoundError:
            return Outcome()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("%s unreadable (%s): acting on the current desired state again", self.path, exc)
            return Outcome()

    def save(self, outcome: Outcome) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(outcome.__dict__).encode())


BusFactory = Callable[[str, str], Awaitable[Any]]


async def _connect_nats(url: str, name: str):
    from fleet.transport import NatsFleetBus

    return await NatsFleetBus.connect(url, name=name, ensure=False)


class DeviceClient:
    def __init__(self, bus_url: str, device_id: str, agent, *, triton_metrics_url: str | None,
                 ensemble_model: str = "detect", report_s: float = 10.0, state_dir: Path,
                 accuracy_s: float = 60.0, labels: dict[str, str] | None = None,
                 connect: BusFactory = _connect_nats, metrics: DeviceMetrics | None = None):
        self.bus_url = bus_url
        self.device_id = check_token(device_id, "device_id")
        self.agent = agent
        self.model = agent.detector_model
        self.report_s = report_s
        self.state_dir = Path(state_dir)
        self.labels = dict(labels or {})
        self.connect = connect
        self.metrics = metrics or DeviceMetrics(agent, triton_metrics_url, ensemble_model, self.state_dir,
                                                accuracy_s=accuracy_s)
        self.outcomes = OutcomeStore(self.state_dir / "device_client.json")
        self.outcome = self.outcomes.load()
        self.bus = None
        self.seq = 0
        self._registered_version: object = ()  # the semver last registered (() : not yet)
        self._pending: asyncio.Queue[DesiredState] | None = None
        self._stop: asyncio.Event | None = None

    # --- acting -----------------------------------------------------------------------------------------

    def _versions(self) -> dict[str, Any]:
        return self.agent.versions()

    def _target(self) -> str:
        from sidecar.agent import served_target

        if self.agent.target:
            return self.agent.target
        try:
            return served_target(self.agent.control.disk_config(self.model))
        except Exception as exc:  # noqa: BLE001 - an unreadable config is not worth failing a registration over
            log.warning("build target of %s unknown (%s)", self.model, exc)
            return "unknown"

    def serving_version(self) -> str | None:
        return self._versions().get("current_model_version")

    def act(self, desired: DesiredState) -> Outcome | None:
        """Carry out `desired` with the agent (blocking); the outcome, or None when the agent is busy with
        something else (try again later)."""
        from sidecar.agent import AgentBusyError
        from sidecar.errors import SidecarError

        versions = self._versions()
        choice = decide(desired, model=self.model, serving=versions.get("current_model_version"),
                        previous=versions.get("previous_model_version"),
                        has_previous=versions.get("previous") is not None)
        outcome = Outcome(desired.rollout_id, desired.generation)
        log.info("device %s: desired %s v%s (generation %d): %s", self.device_id, desired.action, desired.version,
                 desired.generation, choice)
        try:
            if choice == INELIGIBLE:
                outcome.install_state = "ineligible"
                outcome.reason = f"desired state is for model {desired.model}; this device serves {self.model}"
            elif choice == NOTHING:
                outcome.install_state = "installed"
            elif choice == ROLLBACK:
                reason = desired.reason or f"rollout {desired.rollout_id}: back to {desired.version or 'as shipped'}"
                self.agent.rollback(reason)
                outcome.install_state, outcome.reason = "rolled_back", reason
            else:
                bundle = desired.bundle
                self.agent.install(bundle.url, sha256=bundle.sha256, size=bundle.size)
                outcome.install_state = "installed"
        except AgentBusyError:
            return None
        except (SidecarError, OSError, ValueError) as exc:
            outcome.install_state, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
        if outcome.install_state in ("installed", "rolled_back") and choice != NOTHING:
            self.metrics.recheck_accuracy()
        return outcome

    # --- the loop ---------------------------------------------------------------------------------------

    def report(self, metrics: Metrics, interval_s: float) -> Report:
        self.seq += 1
        return Report(device_id=self.device_id, seq=self.seq, model_version=self.serving_version(),
                      install_state=self.outcome.install_state, generation=self.outcome.generation,
                      reason=self.outcome.reason, metrics=metrics, interval_s=interval_s)

    async def _send(self, metrics: Metrics | None = None, interval_s: float = 0.0) -> None:
        metrics = metrics or Metrics()
        if self.bus is None:
            return
        try:
            version = await asyncio.to_thread(self.serving_version)
            if self._registered_version != version:
                target = await asyncio.to_thread(self._target)
                await self.bus.register(Registration(self.device_id, tuple(self.agent.device_classes), target,
                                                     self.model, version, self.labels))
                self._registered_version = version
            report = await asyncio.to_thread(self.report, metrics, interval_s)
            await self.bus.publish_report(report)
        except TransportError as exc:  # seq still grew: the controller sees the gap as reports lost
            log.warning("device %s: report not sent (%s); serving goes on", self.device_id, exc)

    def _offer(self, desired: DesiredState | None) -> None:
        if desired is not None and not self.outcome.acted_on(desired) and self._pending is not None:
            self._pending.put_nowait(desired)

    async def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                async for _, desired in self.bus.watch_desired(self.device_id):
                    self._offer(desired)
            except FleetError as exc:
                log.warning("device %s: watch of the desired state broke (%s); watching again", self.device_id, exc)
            await asyncio.sleep(min(self.report_s, 2.0))

    async def _act(self) -> None:
        while True:
            desired = await self._pending.get()
            while not self._pending.empty():  # only the newest matters
                desired = self._pending.get_nowait()
            if self.outcome.acted_on(desired):
                continue
            self.outcome = Outcome(desired.rollout_id, desired.generation, "installing")
            await self._send()
            outcome = await asyncio.to_thread(self.act, desired)
            if outcome is None:  # the agent was busy: the interval's poll offers it again
                self.outcome = self.outcomes.load()
                continue
            self.outcome = outcome
            await asyncio.to_thread(self.outcomes.save, outcome)
            await self._send()

    async def _connect(self) -> None:
        said = False
        while self.bus is None and not self._stop.is_set():
            try:
                self.bus = await self.connect(self.bus_url, f"device-{self.device_id}")
            except FleetError as exc:
                if not said:
                    log.warning("device %s: NATS at %s unreachable (%s); retrying", self.device_id, self.bus_url, exc)
                    said = True
                await self._wait(self.report_s)

    async def _wait(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Until `stop` is set: connect (retrying), then watch, act and report."""
        self._stop = stop or asyncio.Event()
        self._pending = asyncio.Queue()
        await self._connect()
        if self.bus is None:
            return
        tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._act())]
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            await self._send()
            while not await self._wait(self.report_s):
                now = loop.time()
                metrics = await asyncio.to_thread(self.metrics.collect)
                await self._send(metrics, now - last)
                last = now
                try:
                    self._offer(await self.bus.get_desired(self.device_id))
                except FleetError as exc:
                    log.debug("desired state not read: %s", exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.bus.close()
            self.bus = None

    def start_thread(self) -> "DeviceThread":
        return DeviceThread(self).start()


class DeviceThread:
    """A DeviceClient on its own asyncio loop in a daemon thread."""

    def __init__(self, client: DeviceClient):
        self.client = client
        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.thread = threading.Thread(target=self._main, name=f"fleet-device-{client.device_id}", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.client.run(self.stop_event))
        except Exception:  # noqa: BLE001 - logged: the sidecar keeps serving without the fleet
            log.exception("device client %s stopped", self.client.device_id)
        finally:
            self.loop.close()

    def start(self) -> "DeviceThread":
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout_s)
