"""The rollout controller: drives every active rollout in the edgestack_rollouts bucket, one step at a time.

tick():
  1. ingest the reports the durable consumer has (bus.fetch_reports) into LatestReports
  2. for each rollout that is not final, from its record (compare-and-set revision kept between ticks):
     a. desired states decided but maybe not written (`unwritten`, a crash between save and write): write them
     b. an operator command newer than the record's command_seq: checked against the state, applied or refused
     c. PENDING: plan the cohorts, start stage 0
        RUNNING/PAUSED/WAITING_PROMOTION: place devices registered since (same cohort rule), analyse every
        interval, roll back after failure_limit failed rounds (or an inconclusive one, per policy), pause on an
        inconclusive round (policy pause), promote when the stage's duration has passed since it was deployed (enough
        of its devices reported the new version: min_reporting_devices) and its last round passed
        ROLLING_BACK/ABORTING: finished when every reverted device reports its previous version (devices silent
        or lying since the revert was written, for longer than max_device_staleness, are listed as unconfirmed:
        their desired state stays the previous version)
Every step saves the record BEFORE its side effect (writing desired states), and a write is repeated after a
restart with the same generation, so a controller killed at any point (SIGKILL) resumes from the bucket. The
first analysis after a start waits one interval, so reports lost with the old process are replaced by fresh ones.
Each event is one JSON line on stderr (or `log`).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, Callable

from fleet.analysis import Aggregate, LatestReports, aggregate, analyse, fresh_reports, merge
from fleet.cohorts import plan_cohorts
from fleet.errors import ConflictError, FleetError, ProtocolError, RolloutError
from fleet.protocol import DesiredState, FleetBus, Registration, Report
from fleet.rollout import REVERTING, Assignment, Rollout, State, check_command

DEFAULT_REGISTRATION_REFRESH_S = 30.0


def json_log(entry: dict[str, Any]) -> None:
    print(json.dumps(entry, separators=(",", ":"), default=str), file=sys.stderr, flush=True)


class Controller:
    """Drives rollouts over a FleetBus. `clock` gives seconds since the epoch (tests move it)."""

    def __init__(self, bus: FleetBus, *, clock: Callable[[], float] = time.time,
                 log: Callable[[dict[str, Any]], None] = json_log,
                 registration_refresh_s: float = DEFAULT_REGISTRATION_REFRESH_S, report_batch: int = 10_000,
                 fetch_timeout_s: float = 0.5) -> None:
        self.bus, self.clock, self.log = bus, clock, log
        self.registration_refresh_s = registration_refresh_s
        self.report_batch, self.fetch_timeout_s = report_batch, fetch_timeout_s
        self.latest = LatestReports()
        self.started_at = clock()
        self.registrations: dict[str, Registration] = {}
        self._registrations_at: float | None = None
        self._records: dict[str, tuple[Rollout, int]] = {}
        self._final: set[str] = set()

    async def run(self, stop: asyncio.Event, *, idle_s: float = 0.5) -> None:
        """tick() until `stop` is set; a failing tick is logged and retried (NATS may be reconnecting)."""
        self.log({"event": "controller_started", "time": self.clock()})
        while not stop.is_set():
            try:
                await self.tick()
            except FleetError as exc:
                self.log({"event": "tick_failed", "error": f"{type(exc).__name__}: {exc}"})
            try:
                await asyncio.wait_for(stop.wait(), idle_s)
            except asyncio.TimeoutError:
                pass
        self.log({"event": "controller_stopped", "time": self.clock()})

    async def tick(self) -> None:
        self.latest.ingest(await self.bus.fetch_reports(self.report_batch, self.fetch_timeout_s), self.clock())
        for rollout_id in await self.bus.list_rollouts():
            if rollout_id in self._final:
                continue
            try:
                await self._advance(rollout_id)
            except ConflictError as exc:
                self._records.pop(rollout_id, None)
                self.log({"event": "record_conflict", "rollout": rollout_id, "error": str(exc)})
            except ProtocolError as exc:
                self._final.add(rollout_id)
                self.log({"event": "record_unreadable", "rollout": rollout_id, "error": str(exc)})

    async def _load(self, rollout_id: str) -> tuple[Rollout | None, int]:
        if rollout_id in self._records:
            return self._records[rollout_id]
        data, revision = await self.bus.load_rollout(rollout_id)
        return (Rollout.from_dict(data) if data is not None else None), revision

    async def _save(self, rollout: Rollout, revision: int) -> int:
        self._records.pop(rollout.id, None)  # a failed save must reload
        revision = await self.bus.save_rollout(rollout.id, rollout.to_dict(), revision)
        self._records[rollout.id] = (rollout, revision)
        for entry in rollout.fresh_events:
            self.log({"rollout": rollout.id, **entry})
        rollout.fresh_events.clear()
        if rollout.terminal:
            self._final.add(rollout.id)
            self._records.pop(rollout.id, None)
        return revision

    async def _refresh_registrations(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self._registrations_at is None or now - self._registrations_at >= self.registration_refresh_s:
            self.registrations = await self.bus.registrations()
            self._registrations_at = now
            return True
        return False

    async def _advance(self, rollout_id: str) -> None:
        rollout, revision = await self._load(rollout_id)
        if rollout is None:
            return
        if rollout.terminal:
            self._final.add(rollout_id)
            return
        if rollout.unwritten is not None:
            revision = await self._finish_write(rollout, revision)
        revision = await self._apply_command(rollout, revision)
        if rollout.state in REVERTING:
            await self._check_reverted(rollout, revision)
        elif rollout.state is State.PENDING:
            await self._refresh_registrations(force=True)
            await self._begin_stage(rollout, revision, 0)
        elif rollout.state is State.RUNNING and rollout.stage_started_at is None:
            await self._refresh_registrations(force=True)
            await self._begin_stage(rollout, revision, rollout.stage)
        elif not rollout.terminal:
            await self._observe(rollout, revision)

    # --- writing desired states -------------------------------------------------------------------------------

    def _serving(self, device_id: str) -> str | None:
        report = self.latest.latest.get(device_id, (None, 0.0))[0]
        if isinstance(report, Report):
            return report.model_version
        registration = self.registrations.get(device_id)
        return registration.model_version if registration else None

    def _desired(self, rollout: Rollout, device_id: str, a: Assignment) -> DesiredState | None:
        release, stage = rollout.release, rollout.strategy.stages[a.stage]
        if a.action == "rollback":
            return DesiredState(rollout_id=rollout.id, model=release.model, version=a.version_before,
                                action="rollback", generation=a.generation, reason=(rollout.revert or {}).get(
                                    "reason", "rollout reverted"))
        registration = self.registrations.get(device_id)
        classes = registration.device_classes if registration else (rollout.classes.get(device_id, ""),)
        bundle = release.bundle_for(classes)
        if bundle is None:
            return None
        return DesiredState(rollout_id=rollout.id, model=release.model, version=release.version, action="install",
                            generation=a.generation, bundle=bundle, reason=f"rollout {rollout.id} stage {stage.name}")

    async def _finish_write(self, rollout: Rollout, revision: int) -> int:
        """Write every desired state of generation `unwritten` (again, after a crash: same generation), then
        record that they are written."""
        if not self.registrations:
            await self._refresh_registrations(force=True)
        generation, now = rollout.unwritten, self.clock()
        items = {}
        for device_id, a in rollout.assignments.items():
            if a.generation == generation and (desired := self._desired(rollout, device_id, a)) is not None:
                items[device_id] = desired
        if items:
            await self.bus.put_desired_many(items)
        rollout.unwritten = None
        if rollout.state in REVERTING and rollout.revert is not None and rollout.revert.get("written_at") is None:
            rollout.revert["written_at"] = now
        elif rollout.stage_started_at is None and rollout.state in (State.RUNNING, State.PAUSED):
            rollout.stage_started_at = now
        rollout.note(now, "desired_written", f"{len(items)} desired states written", generation=generation)
        return await self._save(rollout, revision)

    # --- commands ---------------------------------------------------------------------------------------------

    async def _apply_command(self, rollout: Rollout, revision: int) -> int:
        command = await self.bus.get_command(rollout.id)
        if command is None or command.seq <= rollout.command_seq:
            return revision
        rollout.command_seq = command.seq
        now = self.clock()
        reason = command.reason or f"operator: {command.command}"
        try:
            target = check_command(command.command, rollout.state)
        except RolloutError as exc:
            rollout.note(now, "command_refused", str(exc), command=command.command, seq=command.seq)
            return await self._save(rollout, revision)
        rollout.note(now, "command", reason, command=command.command, seq=command.seq)
        if command.command == "abort":
            return await self._start_revert(rollout, revision, State.ABORTING, reason)
        if command.command == "promote":
            return await self._promote(rollout, revision, reason)
        rollout.move(target, now, reason)
        return await self._save(rollout, revision)

    async def _promote(self, rollout: Rollout, revision: int, reason: str) -> int:
        now = self.clock()
        if rollout.stage + 1 >= len(rollout.strategy.stages):
            rollout.move(State.COMPLETED, now, reason)
            return await self._save(rollout, revision)
        if rollout.state is not State.RUNNING:
            rollout.move(State.RUNNING, now, reason)
        await self._refresh_registrations(force=True)
        started = rollout.stage_started_at is not None or rollout.unwritten is not None
        return await self._begin_stage(rollout, revision, rollout.stage + 1 if started else rollout.stage)

    # --- stages -----------------------------------------------------------------------------------------------

    async def _begin_stage(self, rollout: Rollout, revision: int, stage: int) -> int:
        """Decide the stage's new devices and their before-update baseline, save, then write their desired
        states."""
        now = self.clock()
        strategy = rollout.strategy
        cohorts = plan_cohorts(rollout.id, self.registrations, rollout.release,
                               [s.percentage for s in strategy.stages])
        if not cohorts.stage_of and not rollout.assignments:
            if not any(e["event"] == "waiting_for_devices" for e in rollout.events[-3:]):
                rollout.note(now, "waiting_for_devices", f"no eligible device registered "
                             f"({len(cohorts.ineligible)} ineligible)")
                return await self._save(rollout, revision)
            return revision
        for device_id, why in cohorts.ineligible.items():
            rollout.ineligible.setdefault(device_id, why)
        new = {d: cohorts.classes[d] for d, k in cohorts.stage_of.items() if k <= stage and d not in rollout.assignments}
        staleness = strategy.analysis.max_device_staleness_s
        rollout.baselines[stage] = aggregate(fresh_reports(new, self.latest, now, staleness))
        generation = rollout.next_generation(now)
        for device_id, cls in new.items():
            rollout.assignments[device_id] = Assignment(stage=stage, version_before=self._serving(device_id),
                                                        generation=generation)
            rollout.classes[device_id] = cls
        if rollout.state is State.PENDING:
            rollout.move(State.RUNNING, now, f"{len(cohorts.stage_of)} eligible devices in "
                         f"{len(cohorts.class_sizes())} classes, {len(cohorts.ineligible)} ineligible")
        rollout.stage, rollout.stage_started_at, rollout.last_analysis_at = stage, None, None
        rollout.stage_deployed_at = None
        rollout.consecutive_failures = 0
        rollout.unwritten = generation
        rollout.note(now, "stage_started", f"stage {strategy.stages[stage].name}: {len(new)} devices added, "
                     f"{len(rollout.stage_devices())} in the cohort", generation=generation)
        revision = await self._save(rollout, revision)
        return await self._finish_write(rollout, revision)

    async def _place_new_devices(self, rollout: Rollout, revision: int) -> int:
        if not await self._refresh_registrations():
            return revision
        known = rollout.assignments.keys() | rollout.ineligible.keys()
        if not (self.registrations.keys() - known):
            return revision
        cohorts = plan_cohorts(rollout.id, self.registrations, rollout.release,
                               [s.percentage for s in rollout.strategy.stages])
        now = self.clock()
        for device_id, why in cohorts.ineligible.items():
            if device_id not in rollout.assignments:
                rollout.ineligible.setdefault(device_id, why)
        new = [d for d, k in cohorts.stage_of.items() if k <= rollout.stage and d not in rollout.assignments]
        if not new:
            return await self._save(rollout, revision)
        generation = rollout.next_generation(now)
        for device_id in new:
            rollout.assignments[device_id] = Assignment(stage=rollout.stage, version_before=self._serving(device_id),
                                                        generation=generation)
            rollout.classes[device_id] = cohorts.classes[device_id]
        rollout.unwritten = generation
        rollout.note(now, "devices_placed", f"{len(new)} devices registered mid-rollout joined the stage",
                     generation=generation)
        revision = await self._save(rollout, revision)
        return await self._finish_write(rollout, revision)

    async def _observe(self, rollout: Rollout, revision: int) -> None:
        revision = await self._place_new_devices(rollout, revision)
        now = self.clock()
        strategy, stage = rollout.strategy, rollout.strategy.stages[rollout.stage]
        interval = strategy.analysis.interval_s
        since = rollout.last_analysis_at if rollout.last_analysis_at is not None else rollout.stage_started_at
        if since is not None and now - since >= interval and now - self.started_at >= interval:
            revision = await self._analyse(rollout, revision)
            if rollout.state in REVERTING or rollout.terminal:
                return
        last = rollout.analyses[-1] if rollout.analyses else None
        passed = (last is not None and last["stage"] == rollout.stage and last["time"] >= rollout.stage_started_at
                  and (last["verdict"] == "pass" or (last["verdict"] == "inconclusive"
                                                     and strategy.analysis.inconclusive == "continue")))
        if rollout.stage_deployed_at is None and last is not None and last["stage"] == rollout.stage \
                and last["time"] >= (rollout.stage_started_at or 0.0) \
                and last["counts"]["updated"] >= strategy.analysis.min_reporting_devices * last["counts"]["targeted"]:
            rollout.stage_deployed_at = last["time"]
            rollout.note(now, "stage_deployed", f"stage {stage.name}: {last['counts']['updated']} of "
                         f"{last['counts']['targeted']} devices run {rollout.release.version}; its "
                         f"{stage.duration_s:g}s start now")
            revision = await self._save(rollout, revision)
        if rollout.state is not State.RUNNING or not passed or rollout.stage_deployed_at is None \
                or now - rollout.stage_deployed_at < stage.duration_s:
            return
        if rollout.stage + 1 >= len(strategy.stages):
            rollout.move(State.COMPLETED, now, f"stage {stage.name} passed; every stage done")
            await self._save(rollout, revision)
        elif strategy.auto_promote:
            rollout.note(now, "stage_passed", f"stage {stage.name} passed its {stage.duration_s:g}s")
            await self._begin_stage(rollout, revision, rollout.stage + 1)
        else:
            rollout.move(State.WAITING_PROMOTION, now, f"stage {stage.name} passed; auto_promote is off")
            await self._save(rollout, revision)

    async def _analyse(self, rollout: Rollout, revision: int) -> int:
        now = self.clock()
        analysis, stage = rollout.strategy.analysis, rollout.strategy.stages[rollout.stage]
        cohort = {d: (rollout.classes[d], a.generation) for d, a in rollout.assignments.items()
                  if a.stage <= rollout.stage and a.action == "install"}
        control = {}
        for device_id, registration in self.registrations.items():
            if device_id not in rollout.assignments and device_id not in rollout.ineligible \
                    and registration.model == rollout.release.model:
                control[device_id] = registration.device_classes[0]
        scopes: dict[str, list[Aggregate]] = {}
        for k in range(rollout.stage + 1):
            for scope, agg in rollout.baselines.get(k, {}).items():
                scopes.setdefault(scope, []).append(agg)
        before = {scope: merge(parts) for scope, parts in scopes.items()}
        verdict = analyse(stage=stage, stage_index=rollout.stage, cohort=cohort, control=control, before=before,
                          latest=self.latest, version=rollout.release.version, now=now,
                          staleness_s=analysis.max_device_staleness_s, min_reporting=analysis.min_reporting_devices)
        rollout.add_analysis(verdict, before)
        rollout.last_analysis_at = now
        rollout.note(now, "analysis", verdict.reason, verdict=verdict.verdict)
        if verdict.verdict == "pass":
            rollout.consecutive_failures = 0
        elif verdict.verdict == "fail":
            rollout.consecutive_failures += 1
            if rollout.consecutive_failures >= analysis.failure_limit:
                return await self._start_revert(rollout, revision, State.ROLLING_BACK,
                                                f"{rollout.consecutive_failures} failed analyses in stage "
                                                f"{stage.name}: {verdict.reason}", failures=verdict.failures)
        elif analysis.inconclusive == "rollback":
            return await self._start_revert(rollout, revision, State.ROLLING_BACK, f"inconclusive: {verdict.reason}")
        elif analysis.inconclusive == "pause" and rollout.state is State.RUNNING:
            rollout.move(State.PAUSED, now, f"inconclusive analysis: {verdict.reason}")
        return await self._save(rollout, revision)

    # --- rollback and abort -----------------------------------------------------------------------------------

    async def _start_revert(self, rollout: Rollout, revision: int, target: State, reason: str,
                            failures: list[dict[str, Any]] | None = None) -> int:
        now = self.clock()
        generation = rollout.next_generation(now)
        for a in rollout.assignments.values():
            a.action, a.generation = "rollback", generation
        rollout.revert = {"reason": reason, "triggered_at": now, "written_at": None, "reverted_at": None,
                          "seconds": None, "devices": len(rollout.assignments), "unconfirmed": [],
                          "failures": failures or []}
        rollout.move(target, now, reason, devices=len(rollout.assignments))
        rollout.unwritten = generation
        revision = await self._save(rollout, revision)
        return await self._finish_write(rollout, revision)

    async def _check_reverted(self, rollout: Rollout, revision: int) -> None:
        revert = rollout.revert or {}
        written_at = revert.get("written_at")
        if written_at is None:
            return
        now = self.clock()
        staleness = rollout.strategy.analysis.max_device_staleness_s
        waiting, unconfirmed = 0, []
        for device_id, a in rollout.assignments.items():
            message, received = self.latest.latest.get(device_id, (None, 0.0))
            if isinstance(message, Report) and message.generation >= a.generation \
                    and message.model_version == a.version_before:
                continue
            silent = received <= written_at or not isinstance(message, Report)  # nothing since, or only lies
            if silent and now - written_at > staleness:
                unconfirmed.append(device_id)
            else:
                waiting += 1
        if waiting:
            if waiting != revert.get("waiting") and now - revert.get("progress_at", 0.0) >= \
                    rollout.strategy.analysis.interval_s:
                revert.update(waiting=waiting, progress_at=now)  # for the view; saved at most once an interval
                await self._save(rollout, revision)
            return
        revert.update(reverted_at=now, seconds=round(now - revert["triggered_at"], 3), unconfirmed=unconfirmed)
        final = State.ROLLED_BACK if rollout.state is State.ROLLING_BACK else State.ABORTED
        rollout.move(final, now, f"{len(rollout.assignments) - len(unconfirmed)} devices back on their previous "
                     f"version in {revert['seconds']:g}s" + (f", {len(unconfirmed)} silent (unconfirmed)"
                                                             if unconfirmed else ""))
        await self._save(rollout, revision)

