"""sidecar.agent's install path, state by state and outcome by outcome, against an in-memory Triton
(tests.unit.sidecar_fakes): where each failure leaves the persisted state, the blocklist, the history, the
version folders, the trust floor and what Triton serves. Real-Triton counterparts: tests/integration/test_sidecar_*."""
from __future__ import annotations

import inspect
import threading
import time

import pytest

from sidecar.blocklist import TRANSIENT, VERIFIED_BAD
from sidecar.errors import (BundleError, DiskSpaceError, DownloadError, GateInconclusiveError, HealthGateError,
                            SignatureError, StateError, TritonControlError, TritonUnavailableError)
from sidecar.keys import generate_key
from sidecar.state import State
from sidecar.triton_control import TritonControl
from tests.unit.sidecar_fakes import Crash, FakeTriton, bundle_url, crash_in, device  # noqa: F401 - fixtures

FORWARD = [State.VERIFYING, State.STAGING, State.LOADING, State.HEALTH_GATE, State.COMMITTING, State.PROBATION,
           State.DONE]


def test_fake_triton_has_the_signatures_of_triton_control():
    methods = ["disk_config", "load_detector", "pin_ensemble", "restore", "is_live", "is_ready", "ready_versions",
               "pinned_version", "statistics", "infer_detector", "close"]
    for name in methods:
        real, fake = inspect.signature(getattr(TritonControl, name)), inspect.signature(getattr(FakeTriton, name))
        assert list(real.parameters) == list(fake.parameters), name


def assert_serves_v1_only(device) -> None:
    assert device.serves() == (1, [1])
    assert device.disk_versions() == [1] and device.leftovers() == []
    assert not (device.state_dir / "staging").exists()


def assert_discarded(device, reason_part: str) -> None:
    """Refused before anything was loaded: FAILED, nothing rolled back, blocked or trusted."""
    st = device.state()
    assert st.state == State.FAILED and st.committed == [1] and reason_part in st.reason, st.reason
    events = [e["event"] for e in st.history]
    assert events.count("install_failed") == 1 and "rolled_back" not in events
    assert st.bad_bundles == {} and device.trusted_version() is None
    assert_serves_v1_only(device)


def assert_rolled_back(device, agent, kind: str, reason_part: str) -> None:
    st = device.state()
    assert st.state == State.FAILED and st.committed == [1] and st.failure_kind == kind
    assert reason_part in st.reason, st.reason
    rolled = [e for e in st.history if e["event"] == "rolled_back"][-1]
    assert (rolled["kind"], rolled["bad_version"], rolled["restored"]) == (kind, 2, 1)
    assert rolled["bad"] == (kind == VERIFIED_BAD)
    assert [b["sha256"] for b in agent.blocked()] == ([rolled["bundle_sha256"]] if kind == VERIFIED_BAD else [])
    assert [new for _, new in device.moves()[-2:]] == [State.ROLLING_BACK, State.FAILED]
    assert_serves_v1_only(device)


# --- success --------------------------------------------------------------------------------------------

def test_install_gates_commits_and_watches_the_new_version(device):
    device.triton.serve(1, success=10, compute_ns=10_000_000)
    seen: list[State] = []
    agent = device.agent(on_transition=seen.append)
    status = agent.install(device.bundle(2))
    assert status["state"] == "DONE" and status["current"] == 2 and status["committed"] == [1, 2]
    assert seen == FORWARD and device.moves() == list(zip([State.IDLE, *FORWARD], FORWARD))
    assert device.serves() == (2, [2]) and device.disk_versions() == [1, 2] and device.leftovers() == []
    assert device.trusted_version() == 2 and agent.blocked() == []
    assert device.gate.calls == [{"candidate": 2, "previous": 1, "expected": 1, "require_expected_outputs": True}]
    assert device.triton.calls_of("load_detector") == [([1, 2],), ([2],)]  # the candidate beside v1, then alone
    events = [e["event"] for e in device.state().history if e["event"] != "transition"]
    assert events == ["initialized", "install_started", "verified", "unverified_class", "gate_passed", "committed",
                      "probation_passed"]
    assert device.state().baseline["compute_infer_ns_per_inference"] == 1_000_000
    assert device.triton.closed >= 1, "no idle connection to Triton is kept after an install"


def test_install_from_a_url_downloads_first(device, bundle_url):
    agent = device.agent()
    url, sha256, size = bundle_url(device.bundle(2))
    assert agent.install(url, sha256=sha256, size=size)["current"] == 2
    assert device.moves()[:2] == [(State.IDLE, State.DOWNLOADING), (State.DOWNLOADING, State.VERIFYING)]
    assert (device.state_dir / "downloads" / "v2.bundle").is_file()


def test_a_later_install_keeps_the_last_versions_and_collects_the_rest(device):
    agent = device.agent(keep_versions=2)
    for n in (2, 3):
        assert agent.install(device.bundle(n))["current"] == n
    assert device.state().committed == [2, 3] and device.disk_versions() == [2, 3] and device.serves() == (3, [3])


# --- DOWNLOADING and VERIFYING: refused, nothing staged --------------------------------------------------

def test_a_url_without_its_hash_is_refused_before_downloading(device):
    with pytest.raises(DownloadError, match="needs the bundle's sha256 and size"):
        device.agent().install("http://127.0.0.1:9/v2.bundle")
    assert device.moves() == [(State.IDLE, State.FAILED)]
    assert_discarded(device, "sha256")


def test_a_download_with_the_wrong_hash_fails_in_downloading(device, bundle_url):
    url, _, size = bundle_url(device.bundle(2))
    with pytest.raises(DownloadError, match="sha256"):
        device.agent().install(url, sha256="0" * 64, size=size)
    assert device.moves()[-1] == (State.DOWNLOADING, State.FAILED)
    assert_discarded(device, "DownloadError")


@pytest.mark.parametrize("case", ["missing", "other-keys", "blocked", "disk-full"])
def test_verifying_refuses_without_staging(device, case):
    agent = device.agent(min_free_bytes=1 << 60) if case == "disk-full" else device.agent()
    bundle = device.root / "nothing.bundle" if case == "missing" else device.bundle(
        2, keys=[generate_key()] if case == "other-keys" else None)
    blocked_before = {}
    if case == "blocked":
        device.gate.error = HealthGateError("expected output 0 differs")
        with pytest.raises(HealthGateError):
            agent.install(bundle)
        device.gate.error = None
        blocked_before = device.state().bad_bundles
        assert len(blocked_before) == 1
    error, message = {"missing": (BundleError, "does not exist"), "other-keys": (SignatureError, "unknown key"),
                      "blocked": (BundleError, "rolled back before"), "disk-full": (DiskSpaceError, "must stay free")}[case]
    with pytest.raises(error, match=message):
        agent.install(bundle)
    assert device.moves()[-1] == (State.VERIFYING, State.FAILED)
    st = device.state()
    assert st.state == State.FAILED and st.committed == [1] and error.__name__ in st.reason
    assert st.bad_bundles == blocked_before
    assert len(device.gate.calls) == (1 if case == "blocked" else 0), "a refused bundle is never gated"
    assert_serves_v1_only(device)


# --- STAGING --------------------------------------------------------------------------------------------

def test_disk_filling_up_while_staging_discards_the_half_staged_version(device):
    def fill_disk(state: State) -> None:
        if state == State.STAGING:
            agent.min_free_bytes = 1 << 60

    agent = device.agent(on_transition=fill_disk)
    with pytest.raises(DiskSpaceError):
        agent.install(device.bundle(2))
    assert device.moves()[-2:] == [(State.VERIFYING, State.STAGING), (State.STAGING, State.FAILED)]
    assert_discarded(device, "DiskSpaceError")
    assert device.state().candidate == 2, "the history names the version that was given up"


# --- LOADING, HEALTH_GATE, COMMITTING, PROBATION: rolled back ---------------------------------------------

ROLLBACKS = {  # case -> (state it fails in, how, error raised, failure kind, reason)
    "load-refused": (State.LOADING, ("load_detector", TritonControlError("crashes on load")), TritonControlError,
                     VERIFIED_BAD, "crashes on load"),
    "load-unreachable": (State.LOADING, ("load_detector", TritonUnavailableError("connection reset")),
                         TritonUnavailableError, TRANSIENT, "connection reset"),
    "gate-bad-outputs": (State.HEALTH_GATE, HealthGateError("expected output 0 differs: IoU 0.2"), HealthGateError,
                         VERIFIED_BAD, "IoU 0.2"),
    "gate-inconclusive": (State.HEALTH_GATE, GateInconclusiveError("latency of v2 undecided, too much noise"),
                          GateInconclusiveError, TRANSIENT, "too much noise"),
    "gate-model-fails": (State.HEALTH_GATE, ("infer_detector", TritonControlError("stub crashed")), HealthGateError,
                         VERIFIED_BAD, "stub crashed"),
    "gate-triton-unreachable": (State.HEALTH_GATE, ("infer_detector", TritonUnavailableError("timed out")),
                                HealthGateError, TRANSIENT, "timed out"),
    "pin-refused": (State.COMMITTING, ("pin_ensemble", TritonControlError("ensemble refused v2")), TritonControlError,
                    VERIFIED_BAD, "ensemble refused v2"),
    "pin-unreachable": (State.COMMITTING, ("pin_ensemble", TritonUnavailableError("connection refused")),
                        TritonUnavailableError, TRANSIENT, "connection refused"),
}


@pytest.mark.parametrize("case", ROLLBACKS)
def test_failure_after_staging_rolls_back(device, case):
    state, how, error, kind, reason = ROLLBACKS[case]
    if isinstance(how, tuple):
        device.triton.fail_next(*how)
    else:
        device.gate.error = how
    agent = device.agent()
    with pytest.raises(error, match=reason):
        agent.install(device.bundle(2))
    assert (state, State.ROLLING_BACK) in device.moves()
    assert_rolled_back(device, agent, kind, reason)
    assert device.trusted_version() is None, "a version that never committed raised the trust floor"
    if kind == TRANSIENT:  # nothing was learned against the bundle: it installs once the trouble is gone
        device.gate.error = None
        assert agent.install(device.bundle(2))["state"] == "DONE" and device.serves() == (2, [2])


@pytest.mark.parametrize("case", ["failures", "slow"])
def test_probation_verdict_rolls_back_and_blocks(device, case):
    device.triton.serve(1, success=10, compute_ns=10_000_000)  # v1: 1 ms per inference
    device.triton.traffic[2] = (5, 5, 5_000_000) if case == "failures" else (10, 0, 50_000_000)
    agent = device.agent()
    reason = "5 of 10 inferences failed" if case == "failures" else "computes 5.0 ms per inference"
    with pytest.raises(HealthGateError, match=reason):
        agent.install(device.bundle(2))
    assert (State.PROBATION, State.ROLLING_BACK) in device.moves()
    assert_rolled_back(device, agent, VERIFIED_BAD, reason)


def test_triton_restarted_during_probation_is_transient(device):
    def restart(state: State) -> None:
        if state == State.PROBATION:
            device.triton.restart()

    agent = device.agent(on_transition=restart)
    with pytest.raises(HealthGateError, match="no statistics"):
        agent.install(device.bundle(2))
    assert_rolled_back(device, agent, TRANSIENT, "no statistics")


def test_triton_dead_during_the_gate_leaves_the_rollback_to_recovery(device):
    device.gate.during = lambda candidate: device.triton.kill()
    with pytest.raises(TritonUnavailableError):
        device.agent().install(device.bundle(2))
    st = device.state()
    assert st.state == State.ROLLING_BACK and st.failure_kind == TRANSIENT, "persisted before the rollback failed"
    device.triton.restart()
    status = device.agent().recover()
    assert status["state"] == "FAILED" and status["failure_kind"] == TRANSIENT
    assert device.state().bad_bundles == {} and device.trusted_version() is None
    assert_serves_v1_only(device)


# --- rollback by the operator ----------------------------------------------------------------------------

def test_manual_rollback_restores_the_previous_version_and_blocks_the_bundle(device):
    agent = device.agent()
    agent.install(device.bundle(2))
    status = agent.rollback("false alarms")
    assert status["state"] == "FAILED" and status["current"] == 1 and status["failure_kind"] == VERIFIED_BAD
    assert device.moves()[-2:] == [(State.DONE, State.ROLLING_BACK), (State.ROLLING_BACK, State.FAILED)]
    assert "false alarms" in agent.blocked()[0]["reason"]
    assert_serves_v1_only(device)
    with pytest.raises(StateError, match="only committed version"):
        agent.rollback("again")


@pytest.mark.parametrize("stop_in", [State.LOADING, State.PROBATION])
def test_rollback_requested_during_an_install_stops_it(device, stop_in):
    answers: dict[str, dict] = {}

    def operator(state: State) -> None:
        if state == stop_in:
            threading.Thread(target=lambda: answers.update(status=agent.rollback("operator saw smoke"))).start()
            deadline = time.monotonic() + 10
            while agent._abort is None:  # the request is registered, the rollback waits for the install
                assert time.monotonic() < deadline, "rollback() never asked the install to stop"
                time.sleep(0.005)

    agent = device.agent(on_transition=operator)
    with pytest.raises(HealthGateError, match="rollback requested: operator saw smoke"):
        agent.install(device.bundle(2))
    deadline = time.monotonic() + 10
    while "status" not in answers:
        assert time.monotonic() < deadline, "rollback() did not return after the install stopped"
        time.sleep(0.005)
    assert answers["status"]["state"] == "FAILED" and answers["status"]["current"] == 1
    assert_rolled_back(device, agent, VERIFIED_BAD, "operator saw smoke")


# --- the state machine guards --------------------------------------------------------------------------

def test_an_illegal_transition_is_refused_before_anything_is_persisted(device):
    seen: list[State] = []
    agent = device.agent(on_transition=seen.append)
    agent.install(device.bundle(2))
    st, before = device.state(), device.state_dir.joinpath("state.json").read_bytes()
    for new in (State.PROBATION, State.COMMITTING, State.IDLE):
        with pytest.raises(StateError, match=f"illegal transition DONE -> {new.value}"):
            agent._transition(st, new)
    assert st.state == State.DONE and device.state_dir.joinpath("state.json").read_bytes() == before
    assert seen == FORWARD, "no callback for a refused move"


def test_an_install_is_refused_while_another_is_interrupted(device):
    with pytest.raises(Crash):
        device.agent(on_transition=crash_in(State.HEALTH_GATE)).install(device.bundle(2))
    agent = device.agent()
    with pytest.raises(StateError, match="interrupted in HEALTH_GATE: run recover"):
        agent.install(device.bundle(2))
    assert agent.status()["recovery"].startswith("rollback: the gate did not finish")


def test_versions_name_the_semver_of_the_current_and_previous_folders_through_a_rollback(device):
    agent = device.agent(keep_versions=3)
    assert agent.versions()["current_model_version"] is None  # the version the device shipped with
    agent.install(device.bundle(2))
    agent.install(device.bundle(3))
    versions = agent.versions()
    assert (versions["current_model_version"], versions["previous_model_version"]) == ("1.3.0", "1.2.0")
    agent.rollback("false alarms")
    versions = agent.versions()
    assert (versions["current"], versions["current_model_version"], versions["previous_model_version"]) == \
        (2, "1.2.0", None)
    assert device.state().model_versions == {"2": "1.2.0", "3": "1.3.0"}  # pruned at the next commit
