"""The update agent's persisted state machine.

    IDLE -> [DOWNLOADING] -> VERIFYING -> STAGING -> LOADING -> HEALTH_GATE -> COMMITTING -> PROBATION -> DONE
                                 |           |         |            |                            |
                                 +-----------+--> FAILED            +---- ROLLING_BACK <---------+--> FAILED
                                 (nothing loaded yet: discard)      (a version was loaded: roll back)

The agent persists the NEW state before the side effect that state names (StateStore.save is atomic:
tmp file, fsync, rename, fsync of the folder), so after a crash the file names the step that may be
half done, and RECOVERY says what recover() does about it when the agent starts again. TRANSITIONS lists
every legal move; the agent refuses any other (StateError) before it persists anything.
IDLE, DONE and FAILED are terminal: nothing is in flight and Triton should serve committed[-1].
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from sidecar.errors import StateError
from sidecar.durable import atomic_write

STATE_FORMAT = 1
MAX_HISTORY = 500


class State(str, Enum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGING = "STAGING"
    LOADING = "LOADING"
    HEALTH_GATE = "HEALTH_GATE"
    COMMITTING = "COMMITTING"
    PROBATION = "PROBATION"
    DONE = "DONE"
    ROLLING_BACK = "ROLLING_BACK"
    FAILED = "FAILED"


TERMINAL = frozenset({State.IDLE, State.DONE, State.FAILED})

# The legal moves. From a terminal state an install starts (DOWNLOADING for a URL, VERIFYING for a file), is
# refused before its first step (FAILED), or an operator rolls the serving version back (ROLLING_BACK).
# Before anything is loaded a failure discards (FAILED) and recovery after a crash unstages (IDLE); once a
# version may be loaded, every failure rolls back.
_FROM_TERMINAL = frozenset({State.DOWNLOADING, State.VERIFYING, State.FAILED, State.ROLLING_BACK})
TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: _FROM_TERMINAL,
    State.DONE: _FROM_TERMINAL,
    State.FAILED: _FROM_TERMINAL,
    State.DOWNLOADING: frozenset({State.VERIFYING, State.FAILED, State.IDLE}),
    State.VERIFYING: frozenset({State.STAGING, State.FAILED, State.IDLE}),
    State.STAGING: frozenset({State.LOADING, State.FAILED, State.IDLE}),
    State.LOADING: frozenset({State.HEALTH_GATE, State.ROLLING_BACK}),
    State.HEALTH_GATE: frozenset({State.COMMITTING, State.ROLLING_BACK}),
    State.COMMITTING: frozenset({State.PROBATION, State.ROLLING_BACK}),
    State.PROBATION: frozenset({State.DONE, State.ROLLING_BACK}),
    State.ROLLING_BACK: frozenset({State.FAILED}),
}


def check_transition(old: State, new: State) -> None:
    """StateError unless TRANSITIONS allows the move from `old` to `new`."""
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[old]))
        raise StateError(f"illegal transition {old.value} -> {new.value} (from {old.value}: {allowed})")


class RecoveryAction(str, Enum):
    """What recover() runs for a persisted state (sidecar.agent_rollback maps each to its handler)."""

    RESTORE = "restore"
    DISCARD = "discard"
    UNSTAGE = "unstage"
    ROLLBACK = "rollback"
    FINISH_COMMIT = "finish_commit"
    RESTART_PROBATION = "restart_probation"
    FINISH_ROLLBACK = "finish_rollback"


class Recovery(NamedTuple):
    action: RecoveryAction
    description: str

    def __str__(self) -> str:
        return f"{self.action.value}: {self.description}"


_RESTORE = Recovery(RecoveryAction.RESTORE,
                    "load the committed version, pin the ensemble to it; remove uncommitted leftovers")

# What recover() does when the agent starts and finds each state; every action ends by restoring the
# committed version in Triton.
RECOVERY: dict[State, Recovery] = {
    State.IDLE: _RESTORE,
    State.DONE: _RESTORE,
    State.FAILED: _RESTORE,
    State.DOWNLOADING: Recovery(RecoveryAction.DISCARD,
                                "remove the staging folder (a .part download is kept to resume), back to IDLE"),
    State.VERIFYING: Recovery(RecoveryAction.DISCARD,
                              "remove the staging folder (nothing was trusted or staged), back to IDLE"),
    State.STAGING: Recovery(RecoveryAction.UNSTAGE,
                            "remove the half-staged version folder (never a committed one), back to IDLE"),
    State.LOADING: Recovery(RecoveryAction.ROLLBACK,
                            "the candidate may be half loaded and is unverified: pin the ensemble to the previous "
                            "version, load only that, remove the candidate folder, FAILED (transient: the bundle "
                            "stays installable)"),
    State.HEALTH_GATE: Recovery(RecoveryAction.ROLLBACK,
                                "the gate did not finish: pin previous, load only previous, remove the candidate, "
                                "FAILED (transient: the bundle stays installable)"),
    State.COMMITTING: Recovery(RecoveryAction.FINISH_COMMIT,
                               "the gate passed: pin the ensemble to the candidate, load only it, record it as "
                               "committed and trusted, then probation"),
    State.PROBATION: Recovery(RecoveryAction.RESTART_PROBATION,
                              "the candidate is committed: run a whole probation window again, then DONE "
                              "(or roll back)"),
    State.ROLLING_BACK: Recovery(RecoveryAction.FINISH_ROLLBACK,
                                 "pin previous, load only previous, remove the candidate, FAILED (the bundle is "
                                 "blocked if failure_kind is verified_bad)"),
}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AgentState:
    state: State = State.IDLE
    bundle: str | None = None  # path or URL of the bundle being (or last) installed
    candidate: int | None = None  # version folder N of the install in flight (or the last one)
    previous: int | None = None  # committed version when that install started (the rollback target)
    committed: list[int] = field(default_factory=list)  # last K good versions, oldest first; [-1] serves
    reason: str | None = None  # why the last install or rollback failed
    failure_kind: str | None = None  # of the last rollback: verified_bad or transient (sidecar.blocklist)
    model_version: str | None = None  # candidate's semantic version (from its signed metadata)
    metadata_version: int | None = None
    signed: dict[str, Any] | None = None  # candidate's verified metadata: to finish a commit after a crash
    baseline: dict[str, Any] | None = None  # previous version's statistics, for probation
    bad_bundles: dict[str, str] = field(default_factory=dict)  # metadata sha256 -> why it was verified bad
    # committed version folder (as a string: JSON keys) -> semantic version from its signed metadata; a folder
    # the device shipped with has none
    model_versions: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str | None = None

    @property
    def current(self) -> int | None:
        return self.committed[-1] if self.committed else None

    def semver(self, folder: int | None) -> str | None:
        """The semantic version of a committed version folder; None for one the device shipped with (or a folder
        no longer committed: a rollback leaves its entry until the next commit prunes it)."""
        return self.model_versions.get(str(folder)) if folder in self.committed else None

    def kept_model_versions(self, committed: list[int]) -> dict[str, str]:
        """model_versions pruned to the folders of `committed`."""
        return {k: v for k, v in self.model_versions.items() if int(k) in committed}

    def note(self, event: str, **details: Any) -> dict[str, Any]:
        entry = {"time": now_iso(), "event": event, "state": self.state.value,
                 **{k: v for k, v in details.items() if v is not None}}
        self.history.append(entry)
        del self.history[:-MAX_HISTORY]
        return entry

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return {"format": STATE_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Any) -> "AgentState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise StateError(f"not an agent state (format {STATE_FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in names}
            values["state"] = State(values.get("state", "IDLE"))
            state = cls(**values)
        except (TypeError, ValueError) as exc:
            raise StateError(f"agent state is inconsistent: {exc}") from exc
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in state.committed):
            raise StateError(f"committed versions must be positive integers, not {state.committed!r}")
        if not isinstance(state.model_versions, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in state.model_versions.items()):
            raise StateError(f"model_versions must map version folders to semantic versions, not "
                             f"{state.model_versions!r}")
        if state.state not in TERMINAL and state.previous is None:
            raise StateError(f"state {state.state.value} without the previous version to fall back to")
        if state.state not in TERMINAL | {State.DOWNLOADING, State.VERIFYING} and state.candidate is None:
            raise StateError(f"state {state.state.value} without a candidate version")
        return state


class StateStore:
    """One JSON file, replaced atomically on every save (old or new content, never half)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> AgentState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: unreadable ({exc})") from exc
        try:
            return AgentState.from_dict(json.loads(raw))
        except ValueError as exc:
            raise StateError(f"{self.path}: not JSON ({exc})") from exc

    def save(self, state: AgentState) -> None:
        state.updated_at = now_iso()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(state.to_dict(), indent=1, sort_keys=True).encode() + b"\n")
