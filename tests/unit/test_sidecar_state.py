"""sidecar.state: the persisted agent state (format, validation, history bound, atomic store) and the tables
of legal moves and recovery actions."""
from __future__ import annotations

import json

import pytest

from sidecar.errors import StateError
from sidecar.state import (MAX_HISTORY, RECOVERY, STATE_FORMAT, TERMINAL, TRANSITIONS, AgentState, State, StateStore,
                           check_transition)


def in_flight(**changes) -> AgentState:
    values = dict(state=State.HEALTH_GATE, bundle="/b/v2.bundle", candidate=2, previous=1, committed=[1],
                  failure_kind=None, signed={"version": 2}, bad_bundles={"ab" * 32: "IoU"})
    return AgentState(**{**values, **changes})


def test_a_state_survives_the_store_unchanged(tmp_path):
    store = StateStore(tmp_path / "state" / "state.json")
    assert store.load() is None
    st = in_flight()
    st.note("gate_passed", latency_ms={"verdict": "pass"}, skipped=None)
    store.save(st)
    loaded = store.load()
    assert loaded == st and loaded.updated_at is not None
    assert loaded.history[-1]["state"] == "HEALTH_GATE" and "skipped" not in loaded.history[-1]
    raw = json.loads((tmp_path / "state" / "state.json").read_text())
    assert raw["format"] == STATE_FORMAT and raw["state"] == "HEALTH_GATE" and raw["committed"] == [1]


def test_the_persisted_format_is_the_one_devices_already_have():
    """Existing state files stay readable: the field names and the state names are the format."""
    data = in_flight().to_dict()
    assert set(data) == {"format", "state", "bundle", "candidate", "previous", "committed", "reason", "failure_kind",
                         "model_version", "metadata_version", "signed", "baseline", "bad_bundles", "history",
                         "updated_at", "model_versions"}
    assert [s.value for s in State] == ["IDLE", "DOWNLOADING", "VERIFYING", "STAGING", "LOADING", "HEALTH_GATE",
                                        "COMMITTING", "PROBATION", "DONE", "ROLLING_BACK", "FAILED"]
    assert AgentState.from_dict({**data, "unknown_later_field": 1}) == in_flight(), "unknown fields are ignored"


@pytest.mark.parametrize("change, message", [
    ({"format": 2}, "not an agent state"),
    ({"state": "SLEEPING"}, "inconsistent"),
    ({"committed": [1, 0]}, "positive integers"),
    ({"committed": [True]}, "positive integers"),
    ({"previous": None}, "without the previous version"),
    ({"candidate": None}, "without a candidate"),
])
def test_an_inconsistent_state_is_refused(change, message):
    with pytest.raises(StateError, match=message):
        AgentState.from_dict({**in_flight().to_dict(), **change})


def test_before_staging_there_is_no_candidate_yet_and_terminal_states_need_no_previous():
    assert AgentState.from_dict(in_flight(state=State.VERIFYING, candidate=None).to_dict()).candidate is None
    assert AgentState.from_dict(in_flight(state=State.DONE, previous=None).to_dict()).state == State.DONE


@pytest.mark.parametrize("content, message", [(b"{not json", "not JSON"), (b"[1, 2]", "not an agent state")])
def test_a_damaged_file_is_a_state_error(tmp_path, content, message):
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StateError, match=message):
        StateStore(tmp_path / "state.json").load()


def test_history_keeps_the_last_entries():
    st = AgentState()
    for n in range(MAX_HISTORY + 10):
        st.note("event", n=n)
    assert len(st.history) == MAX_HISTORY and st.history[0]["n"] == 10 and st.history[-1]["n"] == MAX_HISTORY + 9


def test_current_is_the_newest_committed_version():
    assert AgentState().current is None and AgentState(committed=[3, 5]).current == 5


# --- the tables ---------------------------------------------------------------------------------------

def test_the_table_has_every_state_and_only_terminal_states_start_an_install():
    assert set(TRANSITIONS) == set(State)
    assert {old for old, targets in TRANSITIONS.items() if State.DOWNLOADING in targets} == TERMINAL
    assert {old for old, targets in TRANSITIONS.items() if State.VERIFYING in targets} == TERMINAL | {State.DOWNLOADING}
    assert all(State.ROLLING_BACK not in TRANSITIONS[s] for s in (State.DOWNLOADING, State.VERIFYING, State.STAGING))
    assert all(State.IDLE not in TRANSITIONS[s] and State.FAILED not in TRANSITIONS[s]
               for s in (State.LOADING, State.HEALTH_GATE, State.COMMITTING, State.PROBATION)), \
        "once a version may be loaded, the only way out of a failure is a rollback"
    assert TRANSITIONS[State.ROLLING_BACK] == {State.FAILED}


def test_every_state_is_reachable_and_every_path_ends_terminal():
    reached, frontier = {State.IDLE}, [State.IDLE]
    while frontier:
        for new in TRANSITIONS[frontier.pop()] - reached:
            reached.add(new)
            frontier.append(new)
    assert reached == set(State)
    for state in State:  # from every state some terminal state can be reached
        seen, todo = set(), [state]
        while todo:
            current = todo.pop()
            seen.add(current)
            todo.extend(TRANSITIONS[current] - seen)
        assert seen & TERMINAL, state


def test_check_transition_names_the_legal_moves():
    check_transition(State.HEALTH_GATE, State.COMMITTING)
    with pytest.raises(StateError, match=r"illegal transition HEALTH_GATE -> DONE \(from HEALTH_GATE: COMMITTING, "
                                         r"ROLLING_BACK\)"):
        check_transition(State.HEALTH_GATE, State.DONE)


def test_recovery_descriptions_read_as_before():
    """status()["recovery"] shows "<action>: <what it does>"."""
    for state, recovery in RECOVERY.items():
        text = str(recovery)
        assert text.startswith(f"{recovery.action.value}: ") and len(text) > len(recovery.action.value) + 20, state


def test_a_state_file_from_before_semver_tracking_loads_with_none_known():
    data = in_flight(state=State.DONE, committed=[1, 2]).to_dict()
    del data["model_versions"]
    st = AgentState.from_dict(data)
    assert st.model_versions == {} and st.semver(2) is None


def test_semver_is_known_only_for_committed_folders():
    st = AgentState(committed=[2, 3], model_versions={"2": "1.2.0", "3": "1.3.0", "4": "1.4.0"})
    assert (st.semver(3), st.semver(2), st.semver(4), st.semver(None)) == ("1.3.0", "1.2.0", None, None)
    assert st.kept_model_versions([3]) == {"3": "1.3.0"}


@pytest.mark.parametrize("bad", [{"x": "1.0.0"}, {"2": 2}, ["2"]])
def test_malformed_model_versions_are_refused(bad):
    with pytest.raises(StateError, match="model_versions"):
        AgentState.from_dict({**in_flight().to_dict(), "model_versions": bad})
