"""Analysis of a rollout stage: pure functions over the latest report of each device.

LatestReports keeps one entry per device: its last report (or the error of its last message that did not parse),
with the controller's receive time, so staleness never trusts a device's clock. aggregate() reduces the fresh
reports of a set of devices to per-class Aggregates: medians across devices of p50/p99 latency and accuracy (one
device with a noisy camera does not move them), error rate weighted by requests.

analyse() judges one interval of a stage. Each device of the stage cohort is one of:
  updated      acted on the stage's desired state, serves the release      -> its metrics are judged
  installing   acted on it, not done yet
  failed       its own agent refused the update (failed, ineligible)        -> install failures
  rolled_back  its own agent rolled the update back (gate, probation)       -> install failures
  pending      reports, but not yet on the stage's desired state
  lying        its last message did not parse or is out of range, or it claims the generation with another
               version                                                       -> excluded
  stale        its last message is older than max_device_staleness           -> excluded
  silent       nothing received since the controller started                 -> excluded
The round is inconclusive when fewer than min_reporting_devices (a fraction) of the cohort are updated, failed
or rolled back. Install failures trip even then; metric triggers need that quorum. Every trigger is evaluated
over the whole cohort ("*") and per device class. A metric trigger fires when the stage is worse than the
cohort's own baseline from before its update by more than the threshold AND worse than the control (the devices
not yet updated, during the stage) by more than the threshold, where that class has at least MIN_CONTROL
reporting control devices; with one baseline missing, the other decides; with neither, it is not judged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from fleet.protocol import InvalidReport, Report
from fleet.strategy import Stage

ALL = "*"
MIN_CONTROL = 3
METRICS = ("p50_ms", "p99_ms", "error_rate", "accuracy")
DEVICE_STATES = ("updated", "installing", "failed", "rolled_back", "pending", "lying", "stale", "silent")


class LatestReports:
    """The last message of each device with the time it was received (the controller's clock)."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[Report | str, float]] = {}
        self.received = 0
        self.invalid = 0

    def ingest(self, items: Iterable[Report | InvalidReport], now: float) -> None:
        for item in items:
            self.received += 1
            if isinstance(item, InvalidReport):
                self.invalid += 1
                self.latest[item.device_id] = (item.error, now)
            else:
                self.latest[item.device_id] = (item, now)

    def fresh(self, device_id: str, now: float, staleness_s: float) -> Report | None:
        """The device's last report when it parsed and is not stale."""
        entry = self.latest.get(device_id)
        if entry is None or not isinstance(entry[0], Report) or now - entry[1] > staleness_s:
            return None
        return entry[0]


@dataclass
class Aggregate:
    """Metrics of a set of devices: value and how many devices had one, per metric."""
    devices: int = 0
    requests: int = 0
    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def get(self, metric: str) -> float | None:
        return self.values.get(metric)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": self.devices, "requests": self.requests,
                **{m: [round(self.values[m], 6), self.counts[m]] for m in self.values}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Aggregate":
        values = {m: float(data[m][0]) for m in METRICS if data.get(m) is not None}
        counts = {m: int(data[m][1]) for m in values}
        return cls(devices=int(data.get("devices", 0)), requests=int(data.get("requests", 0)), values=values,
                   counts=counts)


def merge(parts: Iterable[Aggregate]) -> Aggregate:
    """Count-weighted mean of aggregates (the baselines of several stages' devices, taken at different times)."""
    out = Aggregate()
    sums: dict[str, float] = {}
    for part in parts:
        out.devices += part.devices
        out.requests += part.requests
        for metric, value in part.values.items():
            sums[metric] = sums.get(metric, 0.0) + value * part.counts[metric]
            out.counts[metric] = out.counts.get(metric, 0) + part.counts[metric]
    out.values = {m: sums[m] / out.counts[m] for m in sums if out.counts[m]}
    return out


class _Collector:
    """Per-metric value lists of one scope, reduced to an Aggregate at the end."""
    __slots__ = ("devices", "requests", "lists", "errors")

    def __init__(self) -> None:
        self.devices, self.requests, self.errors = 0, 0, 0.0
        self.lists: dict[str, list[float]] = {"p50_ms": [], "p99_ms": [], "accuracy": [], "error_rate": []}

    def add(self, report: Report) -> None:
        m = report.metrics
        self.devices += 1
        self.requests += m.requests
        for name, value in (("p50_ms", m.p50_ms), ("p99_ms", m.p99_ms), ("accuracy", m.accuracy)):
            if value is not None:
                self.lists[name].append(value)
        if m.error_rate is not None:
            self.lists["error_rate"].append(m.error_rate)
            self.errors += m.error_rate * m.requests

    def result(self) -> Aggregate:
        agg = Aggregate(devices=self.devices, requests=self.requests)
        for name in ("p50_ms", "p99_ms", "accuracy"):
            if self.lists[name]:
                agg.values[name] = float(np.median(self.lists[name]))
                agg.counts[name] = len(self.lists[name])
        rates = self.lists["error_rate"]
        if rates:
            agg.values["error_rate"] = self.errors / self.requests if self.requests else float(np.mean(rates))
            agg.counts["error_rate"] = len(rates)
        return agg


def aggregate(reports: Iterable[tuple[str, Report]]) -> dict[str, Aggregate]:
    """(class, report) pairs -> Aggregate per class and over all ("*")."""
    collectors: dict[str, _Collector] = {ALL: _Collector()}
    for cls, report in reports:
        collectors[ALL].add(report)
        collector = collectors.get(cls)
        if collector is None:
            collector = collectors[cls] = _Collector()
        collector.add(report)
    return {scope: c.result() for scope, c in collectors.items()}


def fresh_reports(devices: Mapping[str, str], latest: LatestReports, now: float,
                  staleness_s: float) -> list[tuple[str, Report]]:
    """(class, report) for each of `devices` (device -> class) with a fresh, parsed report."""
    out = []
    for device_id, cls in devices.items():
        report = latest.fresh(device_id, now, staleness_s)
        if report is not None:
            out.append((cls, report))
    return out


@dataclass
class Verdict:
    """One analysis round. failures: {trigger, scope, value, threshold, before, control}."""
    verdict: str  # pass | fail | inconclusive
    time: float
    stage: int
    reason: str
    counts: dict[str, int]
    metrics: dict[str, Aggregate]
    control: dict[str, Aggregate]
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "time": self.time, "stage": self.stage, "reason": self.reason,
                "counts": self.counts, "failures": self.failures,
                "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
                "control": {k: v.to_dict() for k, v in self.control.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        return cls(verdict=data["verdict"], time=data["time"], stage=data["stage"], reason=data["reason"],
                   counts=dict(data["counts"]), failures=list(data.get("failures", [])),
                   metrics={k: Aggregate.from_dict(v) for k, v in data.get("metrics", {}).items()},
                   control={k: Aggregate.from_dict(v) for k, v in data.get("control", {}).items()})


def classify(device_id: str, generation: int, version: str, latest: LatestReports, now: float,
             staleness_s: float) -> tuple[str, Report | None]:
    """One of DEVICE_STATES for a cohort device, and its report when it counts as updated, failed or rolled back."""
    entry = latest.latest.get(device_id)
    if entry is None:
        return "silent", None
    message, received = entry
    if now - received > staleness_s:
        return "stale", None
    if not isinstance(message, Report):
        return "lying", None
    if message.generation != generation:
        return "pending", None
    state = message.install_state
    if state == "installed":
        return ("updated", message) if message.model_version == version else ("lying", None)
    if state in ("failed", "ineligible"):
        return "failed", message
    if state == "rolled_back":
        return "rolled_back", message
    return ("installing" if state == "installing" else "pending"), None


def _worse(metric: str, value: float, base: float) -> float | None:
    """How much worse `value` is than `base`, in the trigger's unit (None: cannot say)."""
    if metric == "accuracy":
        return (base - value) * 100.0
    if metric == "p99_ms":
        return (value - base) / base * 100.0 if base > 0 else None
    return None


_METRIC_TRIGGERS = (("accuracy_drop", "accuracy"), ("latency_increase", "p99_ms"))


def analyse(*, stage: Stage, stage_index: int, cohort: Mapping[str, tuple[str, int]], control: Mapping[str, str],
            before: Mapping[str, Aggregate], latest: LatestReports, version: str, now: float, staleness_s: float,
            min_reporting: float) -> Verdict:
    """Judge a stage: cohort is device -> (class, generation of its desired state), control device -> class."""
    counts = dict.fromkeys(DEVICE_STATES, 0)
    class_sizes: dict[str, int] = {}
    class_failed: dict[str, int] = {}
    class_why: dict[str, list[str]] = {}  # class -> "device: the reason its agent gave", the first few
    updated: list[tuple[str, Report]] = []
    for device_id, (cls, generation) in cohort.items():
        state, report = classify(device_id, generation, version, latest, now, staleness_s)
        counts[state] += 1
        class_sizes[cls] = class_sizes.get(cls, 0) + 1
        if state in ("failed", "rolled_back"):
            class_failed[cls] = class_failed.get(cls, 0) + 1
            if report is not None and report.reason and len(class_why.setdefault(cls, [])) < 3:
                class_why[cls].append(f"{device_id}: {report.reason[:300]}")
        elif report is not None:
            updated.append((cls, report))
    targeted = len(cohort)
    counts["targeted"] = targeted
    metrics = aggregate(updated)
    control_aggs = aggregate(fresh_reports(control, latest, now, staleness_s))
    failures: list[dict[str, Any]] = []
    trigger = stage.trigger
    failed_total = counts["failed"] + counts["rolled_back"]
    for scope, failed, size in [(ALL, failed_total, targeted)] + [
            (c, class_failed.get(c, 0), n) for c, n in sorted(class_sizes.items())]:
        share = 100.0 * failed / size if size else 0.0
        if failed and share > trigger.install_failures:
            why = class_why.get(scope) if scope != ALL else [w for ws in class_why.values() for w in ws][:3]
            failures.append({"trigger": "install_failures", "scope": scope, "value": round(share, 3),
                             "threshold": trigger.install_failures, "devices": failed, "of": size,
                             **({"why": why} if why else {})})
    reporting = counts["updated"] + failed_total
    quorum = reporting >= min_reporting * targeted
    if quorum:
        failures += _metric_failures(stage, metrics, before, control_aggs)
    if failures:
        failures.sort(key=lambda f: f["scope"] == ALL)  # the class that fails says more than the whole
        first = failures[0]
        where = "all devices" if first["scope"] == ALL else f"class {first['scope']}"
        reason = f"{first['trigger']} on {where}: {first['value']:g} over threshold {first['threshold']:g}"
        if len(failures) > 1:
            reason += f" (+{len(failures) - 1} more)"
        if first.get("why"):
            reason += f"; {first['why'][0]}"
        verdict = "fail"
    elif not quorum:
        verdict = "inconclusive"
        reason = (f"{reporting} of {targeted} devices reported on the update, fewer than "
                  f"{min_reporting:.0%} (stale {counts['stale']}, silent {counts['silent']}, "
                  f"lying {counts['lying']})")
    else:
        verdict, reason = "pass", f"{reporting} of {targeted} devices reported, no trigger fired"
    return Verdict(verdict=verdict, time=now, stage=stage_index, reason=reason, counts=counts, metrics=metrics,
                   control=control_aggs, failures=failures)


def _metric_failures(stage: Stage, metrics: Mapping[str, Aggregate], before: Mapping[str, Aggregate],
                     control: Mapping[str, Aggregate]) -> list[dict[str, Any]]:
    trigger = stage.trigger
    failures = []
    for scope in sorted(metrics, key=lambda s: (s != ALL, s)):
        agg = metrics[scope]
        if trigger.error_rate is not None and (rate := agg.get("error_rate")) is not None and rate > trigger.error_rate:
            failures.append({"trigger": "error_rate", "scope": scope, "value": round(rate, 4),
                             "threshold": trigger.error_rate,
                             "before": _value(before.get(scope), "error_rate"),
                             "control": _value(control.get(scope), "error_rate")})
        for name, metric in _METRIC_TRIGGERS:
            threshold = getattr(trigger, name)
            value = agg.get(metric)
            if threshold is None or value is None:
                continue
            base = _value(before.get(scope), metric)
            ctrl_agg = control.get(scope)
            ctrl = _value(ctrl_agg, metric) if ctrl_agg is not None and ctrl_agg.counts.get(metric, 0) >= MIN_CONTROL \
                else None
            worse = [w for b in (base, ctrl) if b is not None and (w := _worse(metric, value, b)) is not None]
            if worse and all(w > threshold for w in worse):
                failures.append({"trigger": name, "scope": scope, "value": round(min(worse), 3),
                                 "threshold": threshold, "metric": metric, "stage_value": round(value, 4),
                                 "before": base, "control": ctrl})
    return failures


def _value(agg: Aggregate | None, metric: str) -> float | None:
    value = agg.get(metric) if agg is not None else None
    return None if value is None else round(value, 4)
