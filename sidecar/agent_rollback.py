"""The update agent's way back: manual and automatic rollback, recovery after a crash, and the blocked bundles.

A mixin of sidecar.agent.Agent (it uses the agent's control, folders, store, trust and state transitions).
A rollback blocks the bundle only when its kind is verified_bad (sidecar.blocklist); an install interrupted
by a crash of the agent, or failed by Triton trouble, rolls back as transient and may be installed again.
"""
from __future__ import annotations

import shutil
from typing import Any, Callable

from sidecar.blocklist import TRANSIENT, VERIFIED_BAD, blocked_entries, failure_kind, unblock
from sidecar.errors import SidecarError, StateError
from sidecar.state import RECOVERY, TERMINAL, AgentState, RecoveryAction, State
from sidecar.trust import metadata_sha256


class RollbackMixin:
    # --- rollback ---------------------------------------------------------------------------------------

    def rollback(self, reason: str) -> dict[str, Any]:
        """Stop an install in flight (it rolls back at its next step), or roll the serving version back to
        the previous committed one; its folder is removed and its bundle blocked (an operator's verdict)."""
        if self._busy and self._busy.startswith(("install", "recover")):
            self._abort = reason
        with self._exclusive(f"rollback ({reason})", wait_s=900):
            if self._abort_taken:
                self._abort_taken = False
                return self.status()
            self._abort = None
            st = self._load()
            if st.state not in TERMINAL:
                raise StateError(f"an install was interrupted in {st.state.value}: run recover() first")
            if len(st.committed) < 2:
                raise StateError(f"v{st.current} is the only committed version: nothing to roll back to")
            bad, target = st.committed[-1], st.committed[-2]
            if not (st.candidate == bad and st.state == State.DONE):
                st.signed, st.bundle, st.model_version, st.metadata_version = None, None, None, None
            st.candidate, st.previous = bad, target
            self._rollback(st, f"manual rollback: {reason}", VERIFIED_BAD)
            return self.status()

    def _triton_healthy(self) -> bool:
        """Triton answers and has the ensemble loaded: an error it gave came from the model, not from Triton."""
        try:
            return self.control.is_live() and self.control.pinned_version() is not None
        except SidecarError:
            return False

    def _rollback_after(self, st: AgentState, exc: Exception) -> None:
        self._rollback(st, f"{type(exc).__name__}: {exc}", failure_kind(exc, self._triton_healthy))

    def _rollback(self, st: AgentState, reason: str, kind: str) -> None:
        self._log(event="rollback", candidate=st.candidate, previous=st.previous, reason=reason, kind=kind)
        self._transition(st, State.ROLLING_BACK, reason=reason, failure_kind=kind)
        self._finish_rollback(st)

    def _finish_rollback(self, st: AgentState) -> None:
        prev, bad = st.previous, st.candidate
        if not (self.model_dir / str(prev)).is_dir():
            raise StateError(f"cannot roll back: the folder of v{prev} is gone")
        if prev not in self.control.ready_versions():  # the ensemble may be on `bad`: load prev beside it first
            keep_bad = bad is not None and self.control.pinned_version() == bad
            try:
                self.control.load_detector([prev, bad] if keep_bad else [prev])
            except Exception:
                if not keep_bad:
                    raise
                self.control.load_detector([prev])
        self.control.pin_ensemble(prev)
        self.control.load_detector([prev])
        if bad is not None and bad != prev:
            self.folders.remove(bad)
        kind = st.failure_kind if st.failure_kind == VERIFIED_BAD else TRANSIENT
        sha = metadata_sha256(st.signed) if st.signed else None
        if sha and kind == VERIFIED_BAD:
            st.bad_bundles[sha] = st.reason or "rolled back"
        committed = [v for v in st.committed if v != bad]
        st.note("rolled_back", bad_version=bad, restored=prev, bundle=st.bundle, model_version=st.model_version,
                reason=st.reason, kind=kind, bad=kind == VERIFIED_BAD, bundle_sha256=sha)
        self._transition(st, State.FAILED, committed=committed if prev in committed else committed + [prev])

    # --- blocked bundles --------------------------------------------------------------------------------

    def blocked(self) -> list[dict[str, Any]]:
        st = self.store.load()
        return blocked_entries(st) if st else []

    def unblock(self, sha256_prefix: str, reason: str) -> dict[str, Any]:
        """Let a blocked bundle be installed again (BlocklistError if the prefix names none or several)."""
        with self._exclusive("unblock"):
            st = self._load()
            entry = unblock(st, sha256_prefix, reason)
            self.store.save(st)
            self._log(event="unblocked", **entry)
            return entry

    # --- recovery ---------------------------------------------------------------------------------------

    def recover(self) -> dict[str, Any]:
        """Finish or undo what the persisted state says was in flight (sidecar.state.RECOVERY), then make
        Triton serve exactly the committed version. Run at start, and after Triton restarts."""
        with self._exclusive("recover"):
            self._abort_taken = False
            st = self._load()
            found = st.state
            recovery = RECOVERY[found]
            self._log(event="recover", state=found.value, action=str(recovery))
            st.note("recover", found=found.value, action=recovery.action.value)
            RECOVERY_HANDLERS[recovery.action](self, st, found)
            return self.status()

    def _recover_restore(self, st: AgentState, found: State) -> None:
        self._clean_leftovers(st)
        self.control.restore(st.current)
        self.store.save(st)

    def _recover_discard(self, st: AgentState, found: State) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._transition(st, State.IDLE, reason=f"install interrupted in {found.value} (agent restarted); discarded")
        self._recover_restore(st, found)

    def _recover_unstage(self, st: AgentState, found: State) -> None:
        if st.candidate not in st.committed:
            self.folders.remove(st.candidate)
        self._transition(st, State.IDLE, reason=f"install interrupted in {found.value} (agent restarted); unstaged")
        self._recover_restore(st, found)

    def _recover_rollback(self, st: AgentState, found: State) -> None:
        self._rollback(st, f"agent restarted during {found.value}: v{st.candidate} was never verified", TRANSIENT)

    def _recover_finish_commit(self, st: AgentState, found: State) -> None:
        try:
            self._commit(st)
            self._probation(st)
        except Exception as exc:
            self._rollback_after(st, exc)

    def _recover_restart_probation(self, st: AgentState, found: State) -> None:
        try:
            if self.control.pinned_version() != st.candidate or self.control.ready_versions() != [st.candidate]:
                self.control.restore(st.candidate)
            if st.signed:
                self.trust.remember(st.signed)
            self._probation(st)
        except Exception as exc:
            self._rollback_after(st, exc)

    def _recover_finish_rollback(self, st: AgentState, found: State) -> None:
        self._finish_rollback(st)


RecoveryHandler = Callable[[RollbackMixin, AgentState, State], None]
RECOVERY_HANDLERS: dict[RecoveryAction, RecoveryHandler] = {
    RecoveryAction.RESTORE: RollbackMixin._recover_restore,
    RecoveryAction.DISCARD: RollbackMixin._recover_discard,
    RecoveryAction.UNSTAGE: RollbackMixin._recover_unstage,
    RecoveryAction.ROLLBACK: RollbackMixin._recover_rollback,
    RecoveryAction.FINISH_COMMIT: RollbackMixin._recover_finish_commit,
    RecoveryAction.RESTART_PROBATION: RollbackMixin._recover_restart_probation,
    RecoveryAction.FINISH_ROLLBACK: RollbackMixin._recover_finish_rollback,
}
