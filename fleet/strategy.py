"""A rollout strategy: the stages a release goes through and how each is judged, read from YAML.

    stages:
      - name: canary
        percentage: 1            # of each device class (fleet.cohorts), increasing, the last one 100
        duration_hours: 24       # or `duration: 90s | 5m | 24h`: how long the stage is watched before it passes,
                                 # counted from when min_reporting_devices of it run the release
        rollback_trigger: {accuracy_drop: 3.0, latency_increase: 50, error_rate: 5.0, install_failures: 5}
    analysis: {interval: 5m, failure_limit: 2, inconclusive: pause, min_reporting_devices: 0.9,
               max_device_staleness: 15m}
    auto_promote: true

Triggers (each optional; a missing rollback_trigger watches install failures only):
  accuracy_drop      percentage points of fidelity (accuracy 0..1 x 100) below the baseline
  latency_increase   percent of p99 latency over the baseline
  error_rate         percent of requests that failed (absolute, the baseline is shown beside it)
  install_failures   percent of the stage's devices whose own agent refused or rolled back the update. Default
                     5: a cohort of fewer than 20 devices trips on its first failure (canary strictness), a GA
                     stage of 10,000 devices tolerates a few hundred flaky downloads or full disks, which the
                     agents roll back on their own anyway.
Analysis: every `interval` (the first one `interval` after the stage's desired states were written), at least
`min_reporting_devices` (a fraction of the stage's devices) must have reported on the new desired state within
`max_device_staleness` (default 3 intervals), else the round is inconclusive and `inconclusive` says what follows
(pause: wait for an operator, continue: count it as passed, rollback). `failure_limit` consecutive failed rounds
roll the stage back. `auto_promote` false: a stage that passed waits for `edgestack rollout promote`.
A bad field raises StrategyError naming the field, the value and what fits.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fleet.errors import StrategyError

INCONCLUSIVE_POLICIES = ("pause", "continue", "rollback")
DEFAULT_INSTALL_FAILURES = 5.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any, what: str) -> float:
    """Seconds from a number of seconds or a string like 90s, 5m, 24h, 2d."""
    if isinstance(value, bool):
        raise StrategyError(f"{what} = {value!r}: expected seconds or a duration like 90s, 5m, 24h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value)) if isinstance(value, str) else None
        if not match:
            raise StrategyError(f"{what} = {value!r}: expected seconds or a duration like 90s, 5m, 24h")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise StrategyError(f"{what} = {value!r}: must be a finite duration >= 0")
    return seconds


def _number(data: Mapping[str, Any], name: str, what: str, *, low: float, high: float = math.inf,
            default: float | None = None, low_open: bool = False) -> float | None:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StrategyError(f"{what}.{name} = {value!r}: must be a number")
    if value < low or (low_open and value == low) or value > high:
        bound = f"({low:g}" if low_open else f"[{low:g}"
        raise StrategyError(f"{what}.{name} = {value!r}: must be in {bound}, {high:g}]")
    return float(value)


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StrategyError(f"{what} must be a mapping, not {type(value).__name__} {value!r}")
    return value


def _no_unknown(data: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise StrategyError(f"{what}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class Trigger:
    """Thresholds that fail an analysis round; None: not watched."""
    accuracy_drop: float | None = None  # percentage points of fidelity
    latency_increase: float | None = None  # percent of p99 over the baseline
    error_rate: float | None = None  # percent of requests
    install_failures: float = DEFAULT_INSTALL_FAILURES  # percent of the stage's devices

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "Trigger":
        if data is None:
            return cls()
        d = _mapping(data, what)
        _no_unknown(d, {"accuracy_drop", "latency_increase", "error_rate", "install_failures"}, what)
        return cls(accuracy_drop=_number(d, "accuracy_drop", what, low=0, high=100),
                   latency_increase=_number(d, "latency_increase", what, low=0),
                   error_rate=_number(d, "error_rate", what, low=0, high=100),
                   install_failures=_number(d, "install_failures", what, low=0, high=100,
                                            default=DEFAULT_INSTALL_FAILURES))


@dataclass(frozen=True)
class Stage:
    name: str
    percentage: float
    duration_s: float
    trigger: Trigger = field(default_factory=Trigger)


@dataclass(frozen=True)
class Analysis:
    interval_s: float = 300.0
    failure_limit: int = 2
    inconclusive: str = "pause"
    min_reporting_devices: float = 0.9  # fraction of the stage's devices
    max_device_staleness_s: float = 900.0


@dataclass(frozen=True)
class Strategy:
    stages: tuple[Stage, ...]
    analysis: Analysis = field(default_factory=Analysis)
    auto_promote: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The canonical form (durations in seconds); from_dict reads it back unchanged."""
        return {"stages": [{"name": s.name, "percentage": s.percentage, "duration": s.duration_s,
                            "rollback_trigger": asdict(s.trigger)} for s in self.stages],
                "analysis": {"interval": self.analysis.interval_s, "failure_limit": self.analysis.failure_limit,
                             "inconclusive": self.analysis.inconclusive,
                             "min_reporting_devices": self.analysis.min_reporting_devices,
                             "max_device_staleness": self.analysis.max_device_staleness_s},
                "auto_promote": self.auto_promote}

    @classmethod
    def from_dict(cls, data: Any) -> "Strategy":
        d = _mapping(data, "strategy")
        _no_unknown(d, {"stages", "analysis", "auto_promote"}, "strategy")
        raw_stages = d.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise StrategyError(f"stages = {raw_stages!r}: must be a non-empty list of stages")
        stages = tuple(_stage(s, i) for i, s in enumerate(raw_stages))
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise StrategyError(f"stages: names must be unique, not {names}")
        for i in range(1, len(stages)):
            if stages[i].percentage <= stages[i - 1].percentage:
                raise StrategyError(f"stages[{i}].percentage = {stages[i].percentage:g}: must be above the previous "
                                    f"stage's {stages[i - 1].percentage:g} (percentages increase)")
        if stages[-1].percentage != 100:
            raise StrategyError(f"stages[{len(stages) - 1}].percentage = {stages[-1].percentage:g}: the last stage "
                                f"must be 100 (the whole fleet)")
        auto_promote = d.get("auto_promote", True)
        if not isinstance(auto_promote, bool):
            raise StrategyError(f"auto_promote = {auto_promote!r}: must be true or false")
        return cls(stages=stages, analysis=_analysis(d.get("analysis")), auto_promote=auto_promote)


def _stage(data: Any, index: int) -> Stage:
    what = f"stages[{index}]"
    d = _mapping(data, what)
    _no_unknown(d, {"name", "percentage", "duration_hours", "duration", "rollback_trigger"}, what)
    name = d.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise StrategyError(f"{what}.name = {name!r}: must be 1-64 characters of [A-Za-z0-9_-]")
    percentage = _number(d, "percentage", what, low=0, high=100, low_open=True)
    if percentage is None:
        raise StrategyError(f"{what}.percentage is missing: a percentage of the fleet in (0, 100]")
    if "duration_hours" in d and "duration" in d:
        raise StrategyError(f"{what}: give duration_hours or duration, not both")
    if "duration_hours" in d:
        hours = _number(d, "duration_hours", what, low=0)
        duration = (hours or 0.0) * 3600.0
    else:
        duration = parse_duration(d.get("duration", 0), f"{what}.duration")
    return Stage(name=name, percentage=percentage, duration_s=duration,
                 trigger=Trigger.from_dict(d.get("rollback_trigger"), f"{what}.rollback_trigger"))


def _analysis(data: Any) -> Analysis:
    if data is None:
        return Analysis()
    d = _mapping(data, "analysis")
    _no_unknown(d, {"interval", "failure_limit", "inconclusive", "min_reporting_devices", "max_device_staleness"},
                "analysis")
    interval = parse_duration(d.get("interval", Analysis.interval_s), "analysis.interval")
    if interval <= 0:
        raise StrategyError(f"analysis.interval = {d.get('interval')!r}: must be above 0")
    limit = d.get("failure_limit", Analysis.failure_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise StrategyError(f"analysis.failure_limit = {limit!r}: must be an integer >= 1")
    policy = d.get("inconclusive", Analysis.inconclusive)
    if policy not in INCONCLUSIVE_POLICIES:
        raise StrategyError(f"analysis.inconclusive = {policy!r}: must be one of {', '.join(INCONCLUSIVE_POLICIES)}")
    fraction = _number(d, "min_reporting_devices", "analysis", low=0, high=1,
                       default=Analysis.min_reporting_devices)
    staleness = parse_duration(d.get("max_device_staleness", 3 * interval), "analysis.max_device_staleness")
    if staleness <= 0:
        raise StrategyError(f"analysis.max_device_staleness = {staleness!r}: must be above 0")
    return Analysis(interval_s=interval, failure_limit=limit, inconclusive=policy,
                    min_reporting_devices=fraction, max_device_staleness_s=staleness)


def load_strategy(path: str | Path) -> Strategy:
    """Read and validate a strategy YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise StrategyError(f"{path}: not YAML ({exc})") from exc
    try:
        return Strategy.from_dict(data)
    except StrategyError as exc:
        raise StrategyError(f"{path}: {exc}") from exc
