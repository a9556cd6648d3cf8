"""fleet.rollout: the transitions table state by state, commands in every state, the record's JSON form (and
its size at 10,000 devices), generations; the CLI's start and command functions and the fleet view, on the
in-memory bus."""
from __future__ import annotations

import asyncio
import json

import pytest

from fleet.analysis import Aggregate
from fleet.errors import ProtocolError, RolloutError
from fleet.protocol import BundleRef, Release
from fleet.rollout import (COMMAND_TARGETS, TERMINAL, TRANSITIONS, Assignment, Rollout, State, check_command,
                           check_transition, new_rollout)
from fleet.rollout_cli import add_fleet_commands, add_parser, rollout_id_for, send_command, start_rollout
from fleet.strategy import load_strategy
from fleet.view import WIDTH, render, summary_line
from tests.conftest import ROOT
from tests.unit.fleet_fakes import FakeBus

RELEASE = Release(model="detect_detector", version="1.2.0", registry_version="7",
                  bundles={"x86-avx2": BundleRef(url="http://b/a.bundle", sha256="ef" * 32, size=9)})
STRATEGY = load_strategy(ROOT / "specs" / "rollout.yaml")
NOW = 1_900_000_000.0

EXPECTED = {
    State.PENDING: {State.RUNNING, State.PAUSED, State.ABORTING},
    State.RUNNING: {State.PAUSED, State.WAITING_PROMOTION, State.ROLLING_BACK, State.ABORTING, State.COMPLETED},
    State.PAUSED: {State.RUNNING, State.ROLLING_BACK, State.ABORTING, State.COMPLETED},
    State.WAITING_PROMOTION: {State.RUNNING, State.PAUSED, State.ROLLING_BACK, State.ABORTING, State.COMPLETED},
    State.ROLLING_BACK: {State.ROLLED_BACK},
    State.ABORTING: {State.ABORTED},
    State.COMPLETED: set(), State.ROLLED_BACK: set(), State.ABORTED: set(),
}


@pytest.mark.parametrize("old", list(State))
def test_every_state_allows_exactly_its_moves(old):
    assert TRANSITIONS[old] == EXPECTED[old]
    for new in State:
        if new in EXPECTED[old]:
            check_transition(old, new)
        else:
            with pytest.raises(RolloutError, match=f"illegal rollout transition {old.value} -> {new.value}"):
                check_transition(old, new)


def test_a_reverting_rollout_can_only_finish_and_final_states_are_final():
    assert TERMINAL == {s for s, targets in TRANSITIONS.items() if not targets}
    for reverting in (State.ROLLING_BACK, State.ABORTING):
        for command in COMMAND_TARGETS:
            with pytest.raises(RolloutError, match=f"cannot {command} a rollout that is {reverting.value}"):
                check_command(command, reverting)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("command", ["pause", "resume", "promote", "abort"])
def test_commands_in_every_state(command, state):
    accepted = {"pause": {State.PENDING, State.RUNNING, State.WAITING_PROMOTION},
                "resume": {State.PAUSED},
                "promote": {State.RUNNING, State.PAUSED, State.WAITING_PROMOTION},
                "abort": {State.PENDING, State.RUNNING, State.PAUSED, State.WAITING_PROMOTION}}[command]
    if state in accepted:
        target = check_command(command, state)
        assert target in TRANSITIONS[state] or target is state
    else:
        with pytest.raises(RolloutError, match=f"{command} applies to"):
            check_command(command, state)


def test_an_unknown_command_is_refused():
    with pytest.raises(RolloutError, match="unknown command 'restart'"):
        check_command("restart", State.RUNNING)


def big_rollout(devices: int = 10_000) -> Rollout:
    rollout = new_rollout("detect_detector-1_2_0-20260101000000", RELEASE, STRATEGY, NOW)
    rollout.move(State.RUNNING, NOW, "go")
    classes = ("x86-avx2", "x86-vnni", "x86-avx512", "arm64-neon")
    for i in range(devices):
        stage = 0 if i < 100 else 1 if i < 1000 else 2
        rollout.assignments[f"dev-{i:06d}"] = Assignment(stage=stage, version_before="1.1.0" if i % 3 else None,
                                                         generation=1_900_000_000_000 + stage)
        rollout.classes[f"dev-{i:06d}"] = classes[i % 4]
    rollout.baselines = {k: {c: Aggregate(devices=10, requests=100, values={"p99_ms": 40.0}, counts={"p99_ms": 10})
                             for c in classes + ("*",)} for k in range(3)}
    for i in range(300):
        rollout.note(NOW + i, "analysis", "10000 of 10000 devices reported, no trigger fired", verdict="pass")
    return rollout


def test_the_record_round_trips_and_ten_thousand_devices_fit_well_under_a_megabyte():
    rollout = big_rollout()
    data = rollout.to_dict()
    text = json.dumps(data, separators=(",", ":"))
    assert len(text) < 400_000, len(text)
    back = Rollout.from_dict(json.loads(text))
    assert back.to_dict() == data and back.assignments == rollout.assignments and len(back.events) == 200


def test_a_record_that_does_not_parse_says_so():
    data = big_rollout(10).to_dict()
    data["assignments"][0].pop("generation")
    with pytest.raises(ProtocolError, match="rollout record is inconsistent: KeyError"):
        Rollout.from_dict(data)
    with pytest.raises(ProtocolError, match="not a rollout record"):
        Rollout.from_dict({"format": 99})


def test_generations_grow_even_when_the_clock_does_not():
    rollout = new_rollout("r1", RELEASE, STRATEGY, NOW)
    first = rollout.next_generation(NOW)
    assert first == int(NOW * 1000)
    assert rollout.next_generation(NOW) == first + 1 and rollout.next_generation(NOW - 5) == first + 2


def test_the_view_fits_in_100_columns_and_names_the_counts():
    rollout = big_rollout()
    text = render(rollout, now=NOW + 100)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "canary 1%" in text and "targeted" in text and "rolled" in text and "lying" in text
    assert "detect_detector 1.2.0 (registry v7)" in text
    assert len(summary_line(rollout)) <= WIDTH


def test_the_cli_parser_has_every_command():
    import argparse

    parser = argparse.ArgumentParser(prog="edgestack")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    add_fleet_commands(sub.add_parser("fleet").add_subparsers(dest="fleet_command"))
    args = parser.parse_args(["rollout", "promote", "r1", "--reason", "looks good", "--wait", "0"])
    assert (args.command_name, args.id, args.reason, args.wait) == ("promote", "r1", "looks good", 0)
    assert parser.parse_args(["rollout", "status", "--watch", "2"]).watch == 2
    assert parser.parse_args(["fleet", "controller", "--nats", "nats://h:1"]).nats == "nats://h:1"
    assert rollout_id_for("detect_detector", "1.2.0", NOW) == "detect_detector-1_2_0-20300317174640"


def test_start_refuses_a_second_active_rollout_of_the_same_model():
    async def scenario():
        bus = FakeBus()
        await start_rollout(bus, "r1", RELEASE, STRATEGY, NOW)
        with pytest.raises(RolloutError, match="model detect_detector has an active rollout r1 \\(PENDING\\)"):
            await start_rollout(bus, "r2", RELEASE, STRATEGY, NOW)
        with pytest.raises(RolloutError, match="rollout r1 exists already"):
            await start_rollout(bus, "r1", RELEASE, STRATEGY, NOW)
    asyncio.run(scenario())


def test_a_command_is_checked_before_it_is_sent_and_reports_when_nobody_applies_it():
    async def scenario():
        bus = FakeBus()
        await start_rollout(bus, "r1", RELEASE, STRATEGY, NOW)
        with pytest.raises(RolloutError, match="cannot resume a rollout that is PENDING"):
            await send_command(bus, "r1", "resume", None, 0)
        assert await bus.get_command("r1") is None
        answer = await send_command(bus, "r1", "pause", "maintenance", 0.3, poll_s=0.05)
        assert "not applied within 0.3s" in answer and "fleet controller" in answer
        assert (await bus.get_command("r1")).seq == 1
        assert (await send_command(bus, "r1", "abort", None, 0)) == "abort sent to rollout r1 (seq 2)"
        with pytest.raises(RolloutError, match="no rollout 'r9' \\(known: r1\\)"):
            await send_command(bus, "r9", "pause", None, 0)
    asyncio.run(scenario())
