"""The fleet's wire contract: buckets, subjects and the JSON documents on them, and the bus interface.

JetStream key-value buckets (history 1 unless said):
  edgestack_desired   key <device_id> -> DesiredState     written by the controller, watched by the device
  edgestack_devices   key <device_id> -> Registration     written by the device at start and on every change
  edgestack_rollouts  key <rollout_id> -> rollout record  the controller's persisted state (fleet.rollout)
                      key cmd.<rollout_id> -> Command     operator commands (pause, resume, promote, abort)
Stream EDGESTACK_REPORTS, subjects edgestack.report.<device_id> -> Report (limits: age and bytes), read by the
controller through a durable pull consumer, so reports sent while the controller is down are not lost.

Device ids, rollout ids and model names are NATS-safe tokens ([A-Za-z0-9_-], 1..64 characters).
A document that does not parse raises ProtocolError naming the field; the controller counts such a report
against its device (a device that lies) and goes on.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Mapping, Protocol

from fleet.errors import ProtocolError

BUCKET_DESIRED = "edgestack_desired"
BUCKET_DEVICES = "edgestack_devices"
BUCKET_ROLLOUTS = "edgestack_rollouts"
STREAM_REPORTS = "EDGESTACK_REPORTS"
REPORT_SUBJECT_PREFIX = "edgestack.report."
REPORT_SUBJECTS = REPORT_SUBJECT_PREFIX + ">"
COMMAND_KEY_PREFIX = "cmd."

ACTIONS = ("install", "rollback")
INSTALL_STATES = ("idle", "installing", "installed", "failed", "rolled_back", "ineligible")
COMMANDS = ("pause", "resume", "promote", "abort")

# Plausible ranges of reported metrics; a value outside them is a lie (or a broken device), not a measurement.
MAX_LATENCY_MS = 600_000.0
MAX_POWER_W = 10_000.0

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_token(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ProtocolError(f"{what} must be 1-64 characters of [A-Za-z0-9_-], not {value!r}")
    return value


def report_subject(device_id: str) -> str:
    return REPORT_SUBJECT_PREFIX + check_token(device_id, "device_id")


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str, *, optional: bool = False):
    value = data.get(name)
    if value is None and optional:
        return None
    if kind in (int, float) or kind == (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProtocolError(f"{what}.{name} must be a finite number, not {value!r}")
        return value
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}.{name} must be {getattr(kind, '__name__', kind)}, not {value!r}")
    return value


def _mapping(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what} must be a JSON object, not {type(data).__name__}")
    return data


@dataclass(frozen=True)
class BundleRef:
    """Where a device fetches a signed bundle: an HTTP(S) URL (the registry's artifact proxy, S3, any file server)
    or, on one host, an absolute path; with the size and sha256 the download is checked against."""
    url: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, data: Any) -> "BundleRef":
        d = _mapping(data, "bundle")
        url = _field(d, "url", str, "bundle")
        sha = _field(d, "sha256", str, "bundle")
        size = _field(d, "size", int, "bundle")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ProtocolError(f"bundle.sha256 must be 64 lowercase hex digits, not {sha!r}")
        if not isinstance(size, int) or size <= 0:
            raise ProtocolError(f"bundle.size must be a positive integer, not {size!r}")
        return cls(url=url, sha256=sha, size=size)


@dataclass(frozen=True)
class Release:
    """A registered model version as a rollout needs it (fleet.registry resolves one): the signed bundle for
    each device class it was built for, and what was measured per class before release."""
    model: str  # the Triton model the bundles update, e.g. detect_detector
    version: str  # semantic version
    bundles: Mapping[str, BundleRef]  # device class -> bundle
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # device class -> fidelity, p50_ms...
    registry_version: str | None = None  # the registry's own version number, for the record

    def bundle_for(self, device_classes: tuple[str, ...] | list[str]) -> BundleRef | None:
        """The bundle for the first of a device's classes (most specific first) that has one; None: not eligible."""
        return next((self.bundles[c] for c in device_classes if c in self.bundles), None)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "registry_version": self.registry_version,
                "bundles": {c: asdict(b) for c, b in self.bundles.items()},
                "metrics": {c: dict(m) for c, m in self.metrics.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> "Release":
        d = _mapping(data, "release")
        bundles = _mapping(d.get("bundles"), "release.bundles")
        if not bundles:
            raise ProtocolError("release.bundles is empty: no device class can install it")
        return cls(model=check_token(d.get("model"), "release.model"), version=_field(d, "version", str, "release"),
                   bundles={str(c): BundleRef.from_dict(b) for c, b in bundles.items()},
                   metrics={str(c): dict(m) for c, m in _mapping(d.get("metrics") or {}, "release.metrics").items()},
                   registry_version=_field(d, "registry_version", str, "release", optional=True))


@dataclass(frozen=True)
class DesiredState:
    """What the controller wants one device to run. `version` None is the version the device shipped with.
    `generation` grows with every change for that device, so a device acts on each new one once."""
    rollout_id: str
    model: str
    version: str | None
    action: str  # install: fetch `bundle` and install it; rollback: return to `version` (the agent's previous)
    generation: int
    bundle: BundleRef | None = None
    reason: str | None = None
    issued_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "DesiredState":
        d = _mapping(data, "desired")
        action = _field(d, "action", str, "desired")
        if action not in ACTIONS:
            raise ProtocolError(f"desired.action must be one of {ACTIONS}, not {action!r}")
        bundle = BundleRef.from_dict(d["bundle"]) if d.get("bundle") is not None else None
        if action == "install" and bundle is None:
            raise ProtocolError("desired.bundle is required for action 'install'")
        generation = _field(d, "generation", int, "desired")
        if not isinstance(generation, int) or generation < 1:
            raise ProtocolError(f"desired.generation must be a positive integer, not {generation!r}")
        return cls(rollout_id=check_token(d.get("rollout_id"), "desired.rollout_id"),
                   model=check_token(d.get("model"), "desired.model"),
                   version=_field(d, "version", str, "desired", optional=True), action=action,
                   generation=generation, bundle=bundle,
                   reason=_field(d, "reason", str, "desired", optional=True),
                   issued_at=_field(d, "issued_at", str, "desired", optional=True) or now_iso())


@dataclass(frozen=True)
class Registration:
    """A device's identity as the fleet sees it: its classes (builder.device_class, most specific first)."""
    device_id: str
    device_classes: tuple[str, ...]
    target: str
    model: str
    model_version: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    registered_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_classes"], out["labels"] = list(self.device_classes), dict(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Registration":
        d = _mapping(data, "registration")
        classes = _field(d, "device_classes", list, "registration")
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ProtocolError(f"registration.device_classes must be a non-empty list of names, not {classes!r}")
        labels = d.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
            raise ProtocolError("registration.labels must map names to strings")
        return cls(device_id=check_token(d.get("device_id"), "registration.device_id"),
                   device_classes=tuple(classes), target=_field(d, "target", str, "registration"),
                   model=check_token(d.get("model"), "registration.model"),
                   model_version=_field(d, "model_version", str, "registration", optional=True),
                   labels=dict(labels), registered_at=_field(d, "registered_at", str, "registration", optional=True)
                   or now_iso())


@dataclass(frozen=True)
class Metrics:
    """One reporting interval of a device. Latencies of the served pipeline (Triton's summaries), error rate in
    percent of its requests, accuracy as fidelity (0..1) of the last signed-validation-set check, power in watts;
    None where not measured (no requests, no check yet, no power counter)."""
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    error_rate: float | None = None
    accuracy: float | None = None
    power_w: float | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "Metrics":
        d = _mapping(data, "metrics")
        requests = _field(d, "requests", int, "metrics")
        if not isinstance(requests, int) or requests < 0:
            raise ProtocolError(f"metrics.requests must be a non-negative integer, not {requests!r}")
        values: dict[str, float | None] = {}
        for name, low, high in (("p50_ms", 0.0, MAX_LATENCY_MS), ("p99_ms", 0.0, MAX_LATENCY_MS),
                                ("error_rate", 0.0, 100.0), ("accuracy", 0.0, 1.0), ("power_w", 0.0, MAX_POWER_W)):
            value = _field(d, name, (int, float), "metrics", optional=True)
            if value is not None and not low <= value <= high:
                raise ProtocolError(f"metrics.{name} = {value!r} is outside [{low:g}, {high:g}]")
            values[name] = None if value is None else float(value)
        if values["p50_ms"] is not None and values["p99_ms"] is not None and values["p99_ms"] < values["p50_ms"]:
            raise ProtocolError(f"metrics.p99_ms {values['p99_ms']} is below p50_ms {values['p50_ms']}")
        return cls(requests=requests, **values)


@dataclass(frozen=True)
class Report:
    """What a device says every interval, and at once after acting on a desired state."""
    device_id: str
    seq: int  # grows by one per report of this device since its start (a restart starts again at 1)
    model_version: str | None  # serving now (None: the version it shipped with)
    install_state: str  # INSTALL_STATES
    generation: int = 0  # of the last desired state the device acted on (0: none yet)
    reason: str | None = None  # why an install failed or was rolled back
    metrics: Metrics = field(default_factory=Metrics)
    interval_s: float = 0.0
    time: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Report":
        d = _mapping(data, "report")
        state = _field(d, "install_state", str, "report")
        if state not in INSTALL_STATES:
            raise ProtocolError(f"report.install_state must be one of {INSTALL_STATES}, not {state!r}")
        seq = _field(d, "seq", int, "report")
        generation = d.get("generation", 0)
        if not isinstance(seq, int) or seq < 1 or not isinstance(generation, int) or generation < 0:
            raise ProtocolError(f"report.seq must be >= 1 and report.generation >= 0 (integers), not {seq!r}, "
                                f"{generation!r}")
        interval = _field(d, "interval_s", (int, float), "report", optional=True) or 0.0
        if interval < 0:
            raise ProtocolError(f"report.interval_s must be >= 0, not {interval!r}")
        return cls(device_id=check_token(d.get("device_id"), "report.device_id"), seq=seq,
                   model_version=_field(d, "model_version", str, "report", optional=True), install_state=state,
                   generation=generation, reason=_field(d, "reason", str, "report", optional=True),
                   metrics=Metrics.from_dict(d.get("metrics") or {"requests": 0}), interval_s=float(interval),
                   time=_field(d, "time", str, "report", optional=True) or now_iso())


@dataclass(frozen=True)
class Command:
    """An operator's command to a rollout; `seq` grows per rollout so the controller applies each once."""
    command: str
    seq: int
    reason: str | None = None
    issued_at: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Command":
        d = _mapping(data, "command")
        command = _field(d, "command", str, "command")
        if command not in COMMANDS:
            raise ProtocolError(f"command.command must be one of {COMMANDS}, not {command!r}")
        seq = _field(d, "seq", int, "command")
        if not isinstance(seq, int) or seq < 1:
            raise ProtocolError(f"command.seq must be a positive integer, not {seq!r}")
        return cls(command=command, seq=seq, reason=_field(d, "reason", str, "command", optional=True),
                   issued_at=_field(d, "issued_at", str, "command", optional=True) or now_iso())


@dataclass(frozen=True)
class InvalidReport:
    """A message on a report subject that did not parse: counted against `device_id` (from the subject)."""
    device_id: str
    error: str


class FleetBus(Protocol):
    """What the controller, the devices and the simulator need from the transport. fleet.transport implements
    it on NATS JetStream; unit tests use an in-memory fake with the same semantics (revisions, CAS)."""

    async def put_desired(self, device_id: str, desired: DesiredState) -> None: ...

    async def put_desired_many(self, items: Mapping[str, DesiredState]) -> None:
        """Many writes at once (pipelined): a stage of 10,000 devices must not cost 10,000 round trips."""

    async def get_desired(self, device_id: str) -> DesiredState | None: ...

    def watch_desired(self, device_id: str | None = None) -> AsyncIterator[tuple[str, DesiredState | None]]:
        """(device_id, desired) for the current value first, then every change; None when deleted. With no
        device_id, every device's key (one subscription, shared by simulated devices in one process)."""

    async def register(self, registration: Registration) -> None: ...

    async def registrations(self) -> dict[str, Registration]:
        """Every registered device (a registration that does not parse is skipped and logged)."""

    async def publish_report(self, report: Report) -> None: ...

    async def fetch_reports(self, max_messages: int = 10_000,
                            timeout_s: float = 0.5) -> list[Report | InvalidReport]:
        """The reports not yet read by the controller's durable consumer, acknowledged once returned."""

    async def load_rollout(self, rollout_id: str) -> tuple[dict[str, Any] | None, int]:
        """(record, revision); (None, 0) when there is none."""

    async def save_rollout(self, rollout_id: str, record: Mapping[str, Any], revision: int) -> int:
        """Compare-and-set: write when the key is still at `revision` (0: must not exist); the new revision.
        ConflictError when someone else wrote first."""

    async def list_rollouts(self) -> list[str]: ...

    async def put_command(self, rollout_id: str, command: Command) -> None: ...

    async def get_command(self, rollout_id: str) -> Command | None: ...

    async def close(self) -> None: ...
