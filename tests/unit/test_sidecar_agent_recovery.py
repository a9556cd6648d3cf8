"""sidecar.agent_rollback.recover() from every persisted state (sidecar.state.RECOVERY), and the state table
(sidecar.state.TRANSITIONS) against the moves the agent really makes. The agent is "killed" in a state by an
on_transition callback raising Crash (a BaseException: none of its handlers runs), optionally with Triton
restarted too (explicit mode: empty), then a new agent recovers. Real-Triton rows: test_sidecar_crash.py."""
from __future__ import annotations

import pytest

from sidecar.agent_rollback import RECOVERY_HANDLERS
from sidecar.blocklist import TRANSIENT, VERIFIED_BAD
from sidecar.errors import BundleError, DiskSpaceError, DownloadError, HealthGateError, TritonControlError, TritonUnavailableError
from sidecar.state import RECOVERY, TERMINAL, TRANSITIONS, RecoveryAction, State
from tests.unit.sidecar_fakes import Crash, Device, FileServer, crash_in, device  # noqa: F401 - fixture


def test_every_state_has_a_recovery_and_every_action_a_handler():
    assert set(RECOVERY) == set(State)
    assert {r.action for r in RECOVERY.values()} == set(RecoveryAction) == set(RECOVERY_HANDLERS)
    assert all(RECOVERY[s].action == RecoveryAction.RESTORE for s in TERMINAL)
    assert str(RECOVERY[State.STAGING]).startswith("unstage: remove the half-staged version folder")


def persist(device: Device, state: State, files: FileServer) -> None:
    """Leave `state` persisted as a crash in it would, with what the interrupted step may have left behind."""
    if state == State.IDLE:
        device.agent().recover()
    elif state == State.DONE:
        device.agent().install(device.bundle(2))
    elif state in (State.FAILED, State.ROLLING_BACK):
        device.gate.error = HealthGateError("expected output 0 differs")
        with pytest.raises(Crash):
            device.agent(on_transition=crash_in(state)).install(device.bundle(2))
        device.gate.error = None
    else:
        url, sha256, size = files.url_of(device.bundle(2))
        with pytest.raises(Crash):
            device.agent(on_transition=crash_in(state)).install(url, sha256=sha256, size=size)
    assert device.state().state == state
    if state == State.DOWNLOADING:
        (device.state_dir / "downloads").mkdir(parents=True, exist_ok=True)
        (device.state_dir / "downloads" / "v2.bundle.part").write_bytes(b"first half")
    if state == State.STAGING:  # killed mid-copy: a partial temp folder and a partial numbered folder
        (device.model_dir / ".staging-2" / "backends").mkdir(parents=True)
        (device.model_dir / "2").mkdir()
        (device.model_dir / "2" / "model.py").write_text("# half written")
    if state in TERMINAL:  # leftovers of an install that never committed, from an older agent
        (device.model_dir / ".trash-1-999").mkdir()
        device.write_version(device.model_dir / "7", b"never committed")


# persisted state -> (state after recover(), version served, failure_kind, bundle blocked)
AFTER_RECOVERY = {
    State.IDLE: (State.IDLE, 1, None, False),
    State.DONE: (State.DONE, 2, None, False),
    State.FAILED: (State.FAILED, 1, VERIFIED_BAD, True),
    State.DOWNLOADING: (State.IDLE, 1, None, False),
    State.VERIFYING: (State.IDLE, 1, None, False),
    State.STAGING: (State.IDLE, 1, None, False),
    State.LOADING: (State.FAILED, 1, TRANSIENT, False),
    State.HEALTH_GATE: (State.FAILED, 1, TRANSIENT, False),
    State.COMMITTING: (State.DONE, 2, None, False),
    State.PROBATION: (State.DONE, 2, None, False),
    State.ROLLING_BACK: (State.FAILED, 1, VERIFIED_BAD, True),
}


def test_the_expectations_cover_every_state():
    assert set(AFTER_RECOVERY) == set(State)


@pytest.mark.parametrize("triton_restarted", [False, True], ids=["triton-up", "triton-restarted"])
@pytest.mark.parametrize("killed_in", list(State), ids=[s.value for s in State])
def test_recover_from_each_persisted_state(device, killed_in, triton_restarted):
    with FileServer(device.root) as files:
        persist(device, killed_in, files)
    if triton_restarted:
        device.triton.restart()
    final, serves, kind, blocked = AFTER_RECOVERY[killed_in]

    agent = device.agent()
    status = agent.recover()
    st = device.state()
    assert st.state == final and status["state"] == final.value and st.current == serves
    assert device.serves() == (serves, [serves]), "Triton must serve exactly the committed version"
    assert device.disk_versions() == ([1] if serves == 1 else [1, 2]) and device.leftovers() == []
    assert not (device.state_dir / "staging").exists()
    recovered = [e for e in st.history if e["event"] == "recover"][-1]
    assert recovered["found"] == killed_in.value and recovered["action"] == RECOVERY[killed_in].action.value
    assert st.failure_kind == kind and bool(st.bad_bundles) == blocked
    assert device.trusted_version() == (2 if serves == 2 else None)
    if killed_in in (State.DOWNLOADING, State.VERIFYING, State.STAGING):
        assert f"interrupted in {killed_in.value}" in st.reason
    if killed_in == State.DOWNLOADING:
        assert (device.state_dir / "downloads" / "v2.bundle.part").read_bytes() == b"first half", "kept to resume"
    if killed_in in (State.LOADING, State.HEALTH_GATE):
        assert "agent restarted" in st.reason
    assert agent.install(device.bundle(3))["current"] == serves + 1, "the recovered agent takes the next install"


@pytest.mark.parametrize("killed_in", [State.COMMITTING, State.PROBATION])
def test_a_finish_that_fails_during_recovery_rolls_back(device, killed_in):
    device.triton.serve(1, success=10, compute_ns=10_000_000)
    with pytest.raises(Crash):
        device.agent(on_transition=crash_in(killed_in)).install(device.bundle(2))
    if killed_in == State.COMMITTING:
        device.triton.fail_next("pin_ensemble", TritonControlError("ensemble refused v2"))
    else:
        device.triton.traffic[2] = (2, 8, 2_000_000)
    agent = device.agent()
    status = agent.recover()
    assert status["state"] == "FAILED" and status["current"] == 1 and status["failure_kind"] == VERIFIED_BAD
    assert len(agent.blocked()) == 1 and device.serves() == (1, [1]) and device.disk_versions() == [1]


def test_recovery_interrupted_by_triton_resumes_once_triton_is_back(device):
    with pytest.raises(Crash):
        device.agent(on_transition=crash_in(State.HEALTH_GATE)).install(device.bundle(2))
    device.triton.kill()
    with pytest.raises(TritonUnavailableError):
        device.agent().recover()
    assert device.state().state == State.ROLLING_BACK and device.state().failure_kind == TRANSIENT
    device.triton.restart()
    status = device.agent().recover()
    assert status["state"] == "FAILED" and device.serves() == (1, [1]) and device.disk_versions() == [1]
    assert [e["found"] for e in device.state().history if e["event"] == "recover"] == ["HEALTH_GATE", "ROLLING_BACK"]


# --- the state table against the agent ----------------------------------------------------------------

def test_every_move_in_the_table_is_one_the_agent_makes(tmp_path, monkeypatch):
    """Each entry of TRANSITIONS is exercised here (a move outside the table raises StateError in the agent)."""
    moves: set[tuple[State, State]] = set()

    def new_device(name: str) -> Device:
        dev = Device(tmp_path / name)
        monkeypatch.setattr("sidecar.agent.health_gate", dev.gate)
        return dev

    def fails(dev: Device, error: type[BaseException], source, on_transition=None, **install_options) -> None:
        with pytest.raises(error):
            dev.agent(on_transition=on_transition).install(source, **install_options)

    def install_url(dev: Device, bundle, **options) -> None:
        url, sha256, size = files.url_of(bundle)
        dev.agent(**options).install(url, sha256=sha256, size=size)

    def failing_in_probation(dev: Device):
        def on_transition(state: State) -> None:
            if state == State.PROBATION:
                dev.triton.traffic[dev.state().candidate] = (0, 9, 0)

        return on_transition

    with FileServer(tmp_path) as files:
        dev = new_device("main")
        install_url(dev, dev.bundle(2))  # IDLE -> DOWNLOADING -> VERIFYING ... PROBATION -> DONE
        dev.gate.error = HealthGateError("expected output 0 differs")
        fails(dev, HealthGateError, dev.bundle(3))  # DONE -> VERIFYING, HEALTH_GATE -> ROLLING_BACK -> FAILED
        dev.gate.error = None
        dev.agent().rollback("operator")  # FAILED -> ROLLING_BACK
        url, _, size = files.url_of(dev.bundle(4))
        fails(dev, DownloadError, url, sha256="0" * 64, size=size)  # FAILED -> DOWNLOADING -> FAILED
        fails(dev, DownloadError, url)  # FAILED -> FAILED: a URL without its hash
        fails(dev, BundleError, dev.root / "missing.bundle")  # FAILED -> VERIFYING -> FAILED
        dev.agent().install(dev.bundle(4))
        install_url(dev, dev.bundle(5))  # DONE -> DOWNLOADING
        fails(dev, DownloadError, url)  # DONE -> FAILED
        dev.agent().install(dev.bundle(6))
        dev.agent().rollback("operator")  # DONE -> ROLLING_BACK
        dev.triton.fail_next("load_detector", TritonControlError("crashes on load"))
        fails(dev, TritonControlError, dev.bundle(7))  # LOADING -> ROLLING_BACK
        dev.triton.fail_next("pin_ensemble", TritonUnavailableError("connection reset"))
        fails(dev, TritonUnavailableError, dev.bundle(8))  # COMMITTING -> ROLLING_BACK
        fails(dev, HealthGateError, dev.bundle(8), on_transition=failing_in_probation(dev))  # PROBATION -> ROLLING_BACK
        moves |= set(dev.moves())

        dev = new_device("fresh")
        fails(dev, DownloadError, "http://127.0.0.1:9/v2.bundle")  # IDLE -> FAILED
        moves |= set(dev.moves())

        dev = new_device("recovered")
        for killed_in in (State.VERIFYING, State.STAGING):  # IDLE -> VERIFYING, then back to IDLE
            fails(dev, Crash, dev.bundle(2), on_transition=crash_in(killed_in))
            dev.agent().recover()
        with pytest.raises(Crash):
            install_url(dev, dev.bundle(2), on_transition=crash_in(State.DOWNLOADING))
        dev.agent().recover()  # DOWNLOADING -> IDLE
        moves |= set(dev.moves())

        dev = new_device("two-on-disk")
        dev.write_version(dev.model_dir / "2", b"v2 weights")
        dev.agent().rollback("operator")  # IDLE -> ROLLING_BACK: both folders were committed on first start
        moves |= set(dev.moves())

        dev = new_device("staging-fails")

        def fill_disk(state: State) -> None:
            if state == State.STAGING:
                staging_agent.min_free_bytes = 1 << 60

        staging_agent = dev.agent(on_transition=fill_disk)
        with pytest.raises(DiskSpaceError):
            staging_agent.install(dev.bundle(2))  # STAGING -> FAILED
        moves |= set(dev.moves())

    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert moves <= table, f"moves outside the table: {sorted(moves - table)}"
    assert table <= moves, f"table entries never used: {sorted(table - moves)}"
