"""Which failed installs block their bundle for good, and the operator's view of the blocked ones.

A rollback is one of two kinds (AgentState.failure_kind, and `kind` in the history's rolled_back entry):
  verified_bad  the version was checked and found bad: the gate's expected outputs differ, its latency is
                verified over the bound, probation saw too many failures or too slow inferences, a live Triton
                refused to load or run it, or an operator rolled it back. Its signed metadata's sha256 goes
                into AgentState.bad_bundles, and verify refuses the bundle until `sidecar unblock`.
  transient     nothing was learned about the version: the agent or Triton died or restarted, Triton did not
                answer or timed out, the gate's latency was too noisy to decide. The bundle may be installed again.
"""
from __future__ import annotations

import string
from typing import Any, Callable

from sidecar.errors import (BlocklistError, GateInconclusiveError, HealthGateError, TritonControlError,
                            TritonUnavailableError)
from sidecar.state import AgentState

VERIFIED_BAD, TRANSIENT = "verified_bad", "transient"
MIN_PREFIX = 8


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


def failure_kind(exc: BaseException, triton_healthy: Callable[[], bool]) -> str:
    """VERIFIED_BAD or TRANSIENT for what made an install roll back. An error of Triton's counts against the
    version only if Triton is healthy right after it (triton_healthy: live, the ensemble loaded)."""
    chain = _chain(exc)
    if any(isinstance(e, (TritonUnavailableError, GateInconclusiveError)) for e in chain):
        return TRANSIENT
    if any(isinstance(e, TritonControlError) for e in chain):
        return VERIFIED_BAD if triton_healthy() else TRANSIENT
    return VERIFIED_BAD if isinstance(exc, HealthGateError) else TRANSIENT


def blocked_entries(st: AgentState) -> list[dict[str, Any]]:
    """The blocked bundles, each with why and (from the history) when, which bundle and model version."""
    last: dict[str, dict[str, Any]] = {}
    for entry in st.history:
        if entry.get("event") == "rolled_back" and entry.get("bundle_sha256"):
            last[entry["bundle_sha256"]] = entry
    keys = ("time", "bundle", "model_version")
    return [{"sha256": sha, "reason": reason, **{k: last[sha][k] for k in keys if k in last.get(sha, {})}}
            for sha, reason in sorted(st.bad_bundles.items())]


def unblock(st: AgentState, prefix: str, reason: str) -> dict[str, Any]:
    """Remove the one blocked bundle whose sha256 starts with `prefix` and note it in the history; BlocklistError
    when none or several match."""
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_PREFIX or any(c not in string.hexdigits for c in prefix):
        raise BlocklistError(f"give at least {MIN_PREFIX} hex digits of the blocked bundle's sha256, not {prefix!r}")
    matches = [sha for sha in st.bad_bundles if sha.startswith(prefix)]
    if len(matches) != 1:
        listed = ", ".join(sorted(st.bad_bundles)) or "none"
        raise BlocklistError(f"{len(matches)} blocked bundles match {prefix} (blocked: {listed})")
    sha = matches[0]
    blocked_for = st.bad_bundles.pop(sha)
    st.note("unblocked", bundle_sha256=sha, reason=reason, blocked_for=blocked_for)
    return {"sha256": sha, "reason": reason, "blocked_for": blocked_for}
