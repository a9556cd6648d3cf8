"""Which rollbacks block a bundle (sidecar.blocklist.failure_kind), and listing and clearing the blocked ones."""
from __future__ import annotations

import pytest

from sidecar.blocklist import TRANSIENT, VERIFIED_BAD, blocked_entries, failure_kind, unblock
from sidecar.errors import (BlocklistError, GateInconclusiveError, HealthGateError, StateError, TritonControlError,
                            TritonUnavailableError)
from sidecar.state import AgentState

SHA_A = "ab" * 32
SHA_B = "abcd" + "0" * 60


def raised(exc: Exception, cause: Exception | None = None) -> Exception:
    try:
        raise exc from cause
    except Exception as caught:  # noqa: BLE001 - the point is the chain Python builds
        return caught


class Health:
    def __init__(self, healthy: bool):
        self.healthy, self.asked = healthy, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.healthy


@pytest.mark.parametrize("exc, kind", [
    (HealthGateError("expected output 0 differs: best IoU 0.2 < 0.9"), VERIFIED_BAD),
    (HealthGateError("v2 is too slow: over 10 interleaved rounds v2 took 6.1x v1's time"), VERIFIED_BAD),
    (HealthGateError("probation: 3 of 10 inferences failed on v2"), VERIFIED_BAD),
    (GateInconclusiveError("latency of v2 undecided, too much noise"), TRANSIENT),
    (raised(HealthGateError("latency round failed"), TritonUnavailableError("unreachable")), TRANSIENT),
    (TritonUnavailableError("load detect_detector: Triton unreachable (ConnectionRefusedError)"), TRANSIENT),
    (StateError("cannot roll back: the folder of v1 is gone"), TRANSIENT),
    (OSError("disk error"), TRANSIENT),
])
def test_kinds_that_need_no_question_to_triton(exc, kind):
    health = Health(True)
    assert failure_kind(exc, health) == kind
    assert health.asked == 0


@pytest.mark.parametrize("exc", [
    TritonControlError("load detect_detector versions [1, 2]: crashes on load"),
    raised(HealthGateError("v2 does not reproduce 1 of 1 expected outputs"), TritonControlError("infer v2: error")),
    TritonControlError("probation: v2 is no longer ready"),
])
def test_a_triton_error_counts_against_the_version_only_while_triton_is_healthy(exc):
    assert failure_kind(exc, Health(True)) == VERIFIED_BAD
    assert failure_kind(exc, Health(False)) == TRANSIENT


def state_with_blocked() -> AgentState:
    st = AgentState(committed=[1])
    for sha, version in ((SHA_A, "1.2.0"), (SHA_B, "1.3.0")):
        st.bad_bundles[sha] = f"HealthGateError: {version} is too slow"
        st.note("rolled_back", bundle="/bundles/v.bundle", model_version=version, kind=VERIFIED_BAD,
                bundle_sha256=sha)
    return st


def test_blocked_entries_say_why_and_which_bundle():
    entries = blocked_entries(state_with_blocked())
    assert [e["sha256"] for e in entries] == sorted([SHA_A, SHA_B])
    by_sha = {e["sha256"]: e for e in entries}
    assert by_sha[SHA_B]["model_version"] == "1.3.0" and "too slow" in by_sha[SHA_B]["reason"]
    assert by_sha[SHA_A]["bundle"] == "/bundles/v.bundle" and by_sha[SHA_A]["time"]


def test_unblock_by_a_unique_prefix_is_recorded_with_the_reason():
    st = state_with_blocked()
    entry = unblock(st, SHA_B[:8].upper(), "the device was overloaded during the gate")
    assert entry["sha256"] == SHA_B and "too slow" in entry["blocked_for"]
    assert set(st.bad_bundles) == {SHA_A}
    noted = st.history[-1]
    assert noted["event"] == "unblocked" and noted["bundle_sha256"] == SHA_B
    assert noted["reason"] == "the device was overloaded during the gate"


@pytest.mark.parametrize("prefix, message", [
    ("abab", "at least 8 hex digits"),
    ("not-hex-at-all", "at least 8 hex digits"),
    ("ffffffff", "0 blocked bundles match"),
])
def test_unblock_refuses_what_names_no_single_bundle(prefix, message):
    st = state_with_blocked()
    with pytest.raises(BlocklistError, match=message):
        unblock(st, prefix, "why")
    assert set(st.bad_bundles) == {SHA_A, SHA_B} and st.history[-1]["event"] == "rolled_back"


def test_unblock_refuses_an_ambiguous_prefix():
    st = state_with_blocked()
    st.bad_bundles["abababab" + "1" * 56] = "manual rollback: false alarms"
    with pytest.raises(BlocklistError, match="2 blocked bundles match abababab"):
        unblock(st, "abababab", "why")
    assert unblock(st, SHA_A, "the full sha256 is never ambiguous")["sha256"] == SHA_A
