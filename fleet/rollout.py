"""A rollout's persisted record and its state machine.

    PENDING -> RUNNING -> WAITING_PROMOTION (auto_promote false) -> RUNNING (next stage) ... -> COMPLETED
                 |  ^
                 v  |  (inconclusive analysis with policy pause, or `rollout pause`; `resume`)
               PAUSED
    RUNNING | PAUSED | WAITING_PROMOTION -> ROLLING_BACK (a trigger) -> ROLLED_BACK (every device back)
    any active state -> ABORTING (`rollout abort`) -> ABORTED (every updated device back)

The controller (fleet.controller) keeps the record in the edgestack_rollouts bucket and saves it with
compare-and-set after every step; `unwritten` names the generation whose desired states were decided but may not
all be written yet, so a controller that restarts writes them again (same generation: devices act once).
Generations are the controller's clock in milliseconds, raised above any this record used, so they grow for a
device across stages and rollouts. Devices are stored grouped by (stage, action, generation, version before,
class): 10,000 device ids fit in about 150 KB. Baselines are per-class Aggregates (fleet.analysis), not per-device
documents; the analysis history and the events are bounded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from fleet.analysis import Aggregate, Verdict
from fleet.errors import ProtocolError, RolloutError
from fleet.protocol import Release, check_token
from fleet.strategy import Strategy

RECORD_FORMAT = 1
MAX_ANALYSES = 30
MAX_EVENTS = 200


class State(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    WAITING_PROMOTION = "WAITING_PROMOTION"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    ABORTING = "ABORTING"
    ABORTED = "ABORTED"
    COMPLETED = "COMPLETED"


TERMINAL = frozenset({State.COMPLETED, State.ROLLED_BACK, State.ABORTED})
REVERTING = frozenset({State.ROLLING_BACK, State.ABORTING})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.RUNNING, State.PAUSED, State.ABORTING}),
    State.RUNNING: frozenset({State.PAUSED, State.WAITING_PROMOTION, State.ROLLING_BACK, State.ABORTING,
                              State.COMPLETED}),
    State.PAUSED: frozenset({State.RUNNING, State.ROLLING_BACK, State.ABORTING, State.COMPLETED}),
    State.WAITING_PROMOTION: frozenset({State.RUNNING, State.PAUSED, State.ROLLING_BACK, State.ABORTING,
                                        State.COMPLETED}),
    State.ROLLING_BACK: frozenset({State.ROLLED_BACK}),
    State.ABORTING: frozenset({State.ABORTED}),
    State.COMPLETED: frozenset(),
    State.ROLLED_BACK: frozenset(),
    State.ABORTED: frozenset(),
}

# Which operator command each state accepts, and the state it leads to (promote: the next stage's RUNNING, or
# COMPLETED after the last stage; the controller decides which).
COMMAND_TARGETS: dict[str, dict[State, State]] = {
    "pause": {State.PENDING: State.PAUSED, State.RUNNING: State.PAUSED, State.WAITING_PROMOTION: State.PAUSED},
    "resume": {State.PAUSED: State.RUNNING},
    "promote": {State.RUNNING: State.RUNNING, State.PAUSED: State.RUNNING, State.WAITING_PROMOTION: State.RUNNING},
    "abort": {s: State.ABORTING for s in (State.PENDING, State.RUNNING, State.PAUSED, State.WAITING_PROMOTION)},
}


def check_transition(old: State, new: State) -> None:
    """RolloutError unless TRANSITIONS allows the move."""
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old])) or "nothing, it is final"
        raise RolloutError(f"illegal rollout transition {old.value} -> {new.value} (from {old.value}: {allowed})")


def check_command(command: str, state: State) -> State:
    """The state a command leads to from `state`; RolloutError saying which states accept it."""
    targets = COMMAND_TARGETS.get(command)
    if targets is None:
        raise RolloutError(f"unknown command {command!r} (known: {', '.join(COMMAND_TARGETS)})")
    if state not in targets:
        accepted = ", ".join(s.value for s in targets)
        raise RolloutError(f"cannot {command} a rollout that is {state.value} ({command} applies to: {accepted})")
    return targets[state]


@dataclass
class Assignment:
    """What the rollout wrote for one device: at which stage, which action, the generation, and the version it
    served before (the rollback target; None: the version it shipped with)."""
    stage: int
    version_before: str | None
    generation: int
    action: str = "install"


@dataclass
class Rollout:
    id: str
    release: Release
    strategy: Strategy
    state: State = State.PENDING
    stage: int = 0
    created_at: float = 0.0
    stage_started_at: float | None = None  # when the current stage's desired states were all written
    stage_deployed_at: float | None = None  # when enough of its devices first reported the new version: the
    #                                         stage's duration (its bake time) counts from here
    last_analysis_at: float | None = None
    consecutive_failures: int = 0
    assignments: dict[str, Assignment] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)  # assigned device -> its class
    ineligible: dict[str, str] = field(default_factory=dict)
    baselines: dict[int, dict[str, Aggregate]] = field(default_factory=dict)  # stage -> scope -> before update
    analyses: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    command_seq: int = 0
    unwritten: int | None = None  # generation whose desired states may not all be written
    max_generation: int = 0
    revert: dict[str, Any] | None = None  # {reason, triggered_at, written_at, reverted_at, seconds, unconfirmed}
    fresh_events: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)  # not persisted

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def move(self, new: State, now: float, reason: str, **details: Any) -> None:
        check_transition(self.state, new)
        old, self.state = self.state, new
        self.note(now, "state", reason, **{"from": old.value, "to": new.value}, **details)

    def note(self, now: float, event: str, reason: str, **details: Any) -> dict[str, Any]:
        entry = {"time": round(now, 3), "event": event, "state": self.state.value, "stage": self.stage,
                 "reason": reason, **{k: v for k, v in details.items() if v is not None}}
        self.events.append(entry)
        self.fresh_events.append(entry)
        del self.events[:-MAX_EVENTS]
        return entry

    def next_generation(self, now: float) -> int:
        self.max_generation = max(int(now * 1000), self.max_generation + 1)
        return self.max_generation

    def add_analysis(self, verdict: Verdict, before: Mapping[str, Aggregate]) -> None:
        """Keep a round with the cohort's before-update baseline it was judged against."""
        self.analyses.append({**verdict.to_dict(), "before": {k: v.to_dict() for k, v in before.items()}})
        del self.analyses[:-MAX_ANALYSES]

    def stage_devices(self, stage: int | None = None) -> dict[str, Assignment]:
        limit = self.stage if stage is None else stage
        return {d: a for d, a in self.assignments.items() if a.stage <= limit}

    def to_dict(self) -> dict[str, Any]:
        groups: dict[tuple, list[str]] = {}
        for device_id, a in self.assignments.items():
            key = (a.stage, a.action, a.generation, a.version_before, self.classes.get(device_id))
            groups.setdefault(key, []).append(device_id)
        return {"format": RECORD_FORMAT, "id": self.id, "release": self.release.to_dict(),
                "strategy": self.strategy.to_dict(), "state": self.state.value, "stage": self.stage,
                "created_at": self.created_at, "stage_started_at": self.stage_started_at,
                "stage_deployed_at": self.stage_deployed_at,
                "last_analysis_at": self.last_analysis_at, "consecutive_failures": self.consecutive_failures,
                "assignments": [{"stage": k[0], "action": k[1], "generation": k[2], "version_before": k[3],
                                 "class": k[4], "devices": v} for k, v in groups.items()],
                "ineligible": self.ineligible,
                "baselines": {str(k): {s: a.to_dict() for s, a in v.items()} for k, v in self.baselines.items()},
                "analyses": self.analyses, "events": self.events, "command_seq": self.command_seq,
                "unwritten": self.unwritten, "max_generation": self.max_generation, "revert": self.revert}

    @classmethod
    def from_dict(cls, data: Any) -> "Rollout":
        if not isinstance(data, Mapping) or data.get("format") != RECORD_FORMAT:
            raise ProtocolError(f"not a rollout record (format {RECORD_FORMAT})")
        try:
            assignments = {d: Assignment(stage=g["stage"], version_before=g["version_before"],
                                         generation=g["generation"], action=g["action"])
                           for g in data["assignments"] for d in g["devices"]}
            return cls(id=check_token(data["id"], "rollout.id"), release=Release.from_dict(data["release"]),
                       strategy=Strategy.from_dict(data["strategy"]), state=State(data["state"]),
                       stage=int(data["stage"]), created_at=float(data["created_at"]),
                       stage_started_at=data.get("stage_started_at"),
                       stage_deployed_at=data.get("stage_deployed_at"), last_analysis_at=data.get("last_analysis_at"),
                       consecutive_failures=int(data.get("consecutive_failures", 0)), assignments=assignments,
                       classes={d: g["class"] for g in data["assignments"] if g.get("class") for d in g["devices"]},
                       ineligible=dict(data.get("ineligible", {})),
                       baselines={int(k): {s: Aggregate.from_dict(a) for s, a in v.items()}
                                  for k, v in data.get("baselines", {}).items()},
                       analyses=list(data.get("analyses", [])), events=list(data.get("events", [])),
                       command_seq=int(data.get("command_seq", 0)), unwritten=data.get("unwritten"),
                       max_generation=int(data.get("max_generation", 0)), revert=data.get("revert"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"rollout record is inconsistent: {type(exc).__name__} {exc}") from exc


def new_rollout(rollout_id: str, release: Release, strategy: Strategy, now: float) -> Rollout:
    rollout = Rollout(id=check_token(rollout_id, "rollout id"), release=release, strategy=strategy, created_at=now)
    rollout.note(now, "created", f"release {release.model} {release.version}",
                 stages=[f"{s.name} {s.percentage:g}%" for s in strategy.stages])
    return rollout
