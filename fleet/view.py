"""The fleet view of a rollout in the terminal: plain text, at most 100 columns, from the rollout record alone
(the controller stores per-stage device counts and per-class aggregates in it, so any machine can show it).

    render(rollout, now=...) -> str     the whole view
    summary_line(rollout) -> str        one line, for `rollout status` without an id

Sections: the header (release, state, stage, strategy), per stage the devices targeted / updated / installing /
failed / rolled back / pending / silent / stale / lying (from the stage's last analysis), the last analysis's
metrics per scope (all devices, then each class) as stage value, before-update baseline and control (the devices
not yet updated), the rollback or abort with its reason, the last analyses and the last events.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Mapping

from fleet.analysis import ALL
from fleet.rollout import Rollout

WIDTH = 100
COUNT_COLUMNS = (("updated", "updated"), ("installing", "install"), ("failed", "failed"),
                 ("rolled_back", "rolled"), ("pending", "pending"), ("silent", "silent"), ("stale", "stale"),
                 ("lying", "lying"))
METRIC_COLUMNS = (("p50_ms", "p50 ms", 1.0, "{:.1f}"), ("p99_ms", "p99 ms", 1.0, "{:.1f}"),
                  ("error_rate", "errors %", 1.0, "{:.2f}"), ("accuracy", "accuracy %", 100.0, "{:.1f}"))


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _cut(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def summary_line(rollout: Rollout) -> str:
    stage = rollout.strategy.stages[rollout.stage]
    return _cut(f"{rollout.id:<32} {rollout.release.model} {rollout.release.version:<10} {rollout.state.value:<17} "
                f"stage {rollout.stage + 1}/{len(rollout.strategy.stages)} {stage.name} "
                f"({len(rollout.assignments)} devices)")


def _metric(aggregates: Mapping[str, Any], scope: str, metric: str, scale: float, fmt: str) -> str:
    entry = (aggregates.get(scope) or {}).get(metric)
    return fmt.format(entry[0] * scale) if entry else "-"


def render(rollout: Rollout, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines: list[str] = []
    release, strategy = rollout.release, rollout.strategy
    stage = strategy.stages[rollout.stage]
    registry = f" (registry v{release.registry_version})" if release.registry_version else ""
    lines.append(_cut(f"rollout {rollout.id}   {release.model} {release.version}{registry}   {rollout.state.value}"))
    running_for = f", for {_duration(round(now - rollout.stage_started_at))}" if rollout.stage_started_at else ""
    lines.append(_cut(f"stage {rollout.stage + 1}/{len(strategy.stages)} {stage.name}{running_for}; "
                      f"created {_clock(rollout.created_at)} UTC; consecutive failed analyses "
                      f"{rollout.consecutive_failures}/{strategy.analysis.failure_limit}"))
    a = strategy.analysis
    lines.append(_cut("strategy: " + " -> ".join(f"{s.name} {s.percentage:g}% {_duration(s.duration_s)}"
                                                 for s in strategy.stages)))
    lines.append(_cut(f"analysis every {_duration(a.interval_s)}, quorum {a.min_reporting_devices:.0%}, "
                      f"inconclusive: {a.inconclusive}, staleness {_duration(a.max_device_staleness_s)}, "
                      f"auto_promote {'on' if strategy.auto_promote else 'off'}"))
    lines.append(_cut(f"devices: {len(rollout.assignments)} targeted so far, {len(rollout.ineligible)} ineligible "
                      f"(no bundle for their class)"))
    lines += ["", _stage_table(rollout)]
    last = rollout.analyses[-1] if rollout.analyses else None
    if last is not None:
        lines += ["", _metrics_table(last)]
    if rollout.revert:
        r = rollout.revert
        lines += ["", _cut(f"revert: {r['reason']}")]
        done = (f"all back in {r['seconds']:g}s" if r.get("seconds") is not None else
                f"{r.get('waiting', r['devices'])} not back yet (written {_clock(r.get('written_at'))})")
        unconfirmed = r.get("unconfirmed") or []
        lines.append(_cut(f"  {r['devices']} devices, triggered {_clock(r['triggered_at'])}, {done}"
                          + (f", {len(unconfirmed)} silent: {' '.join(unconfirmed[:5])}" if unconfirmed else "")))
    if rollout.analyses:
        lines += ["", "analyses:"]
        for entry in rollout.analyses[-5:]:
            name = strategy.stages[entry["stage"]].name
            lines.append(_cut(f"  {_clock(entry['time'])} {name:<14} {entry['verdict']:<12} {entry['reason']}"))
    lines += ["", "events:"]
    for event in rollout.events[-10:]:
        lines.append(_cut(f"  {_clock(event['time'])} {event['event']:<16} {event['reason']}"))
    return "\n".join(lines)


def _stage_table(rollout: Rollout) -> str:
    header = f"{'stage':<22}{'':<5}{'targeted':>8}" + "".join(f"{title:>8}" for _, title in COUNT_COLUMNS)
    rows = [_cut(header)]
    cumulative = 0
    for index, stage in enumerate(rollout.strategy.stages):
        cumulative += sum(1 for a in rollout.assignments.values() if a.stage == index)
        status = "done" if index < rollout.stage else "now" if index == rollout.stage else "next"
        label = f"{stage.name} {stage.percentage:g}%"
        counts = next((e["counts"] for e in reversed(rollout.analyses) if e["stage"] == index), None)
        row = f"{label[:21]:<22}{status:<5}{cumulative if index <= rollout.stage else '-':>8}"
        row += "".join(f"{counts.get(key, 0) if counts else '-':>8}" for key, _ in COUNT_COLUMNS)
        rows.append(_cut(row))
    return "\n".join(rows)


def _metrics_table(analysis: Mapping[str, Any]) -> str:
    metrics, before, control = analysis.get("metrics", {}), analysis.get("before", {}), analysis.get("control", {})
    rows = [_cut(f"last analysis {_clock(analysis['time'])}: {analysis['verdict']} - stage value "
                 f"(before update / not yet updated)"),
            (f"{'scope':<14}{'devices':>8}  " + "".join(f"{title:<18}" for _, title, _, _ in METRIC_COLUMNS)).rstrip()]
    failing = {(f["scope"], f.get("metric") or {"error_rate": "error_rate"}.get(f["trigger"]))
               for f in analysis.get("failures", [])}
    scopes = [ALL] + sorted(s for s in metrics if s != ALL)
    for scope in scopes:
        devices = (metrics.get(scope) or {}).get("devices", 0)
        cells = []
        for metric, _, scale, fmt in METRIC_COLUMNS:
            cell = (f"{_metric(metrics, scope, metric, scale, fmt)} ({_metric(before, scope, metric, scale, fmt)}/"
                    f"{_metric(control, scope, metric, scale, fmt)})")
            cells.append(f"{('!' + cell) if (scope, metric) in failing else cell:<18}")
        rows.append(_cut(f"{('all' if scope == ALL else scope)[:13]:<14}{devices:>8}  " + "".join(cells).rstrip()))
    return "\n".join(rows)
