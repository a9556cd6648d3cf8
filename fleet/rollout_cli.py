"""`edgestack rollout ...` (operator commands) and `edgestack fleet controller` (the daemon that runs rollouts).

    edgestack rollout start --strategy specs/rollout.yaml --model detect_detector --version 1.2.0 --registry URI
    edgestack rollout start --strategy specs/rollout.yaml --release release.json      # a fleet.protocol.Release
    edgestack rollout status [ID] [--watch S] [--json]
    edgestack rollout pause|resume|promote|abort ID [--reason TEXT] [--wait S]
    edgestack fleet controller [--nats URL]            # SIGTERM or SIGINT stops it after the current tick

`start` writes the rollout record (PENDING) that the controller picks up; one model has at most one active
rollout. A command is checked against the rollout's state here (RolloutError saying which states accept it),
written to cmd.<id> with the next sequence number, and, unless --wait 0, waited for until the controller applied
or refused it. --nats defaults to $EDGESTACK_NATS, else nats://127.0.0.1:4222. add_parser(subparsers) adds the
`rollout` group; add_fleet_commands(fleet_subparsers) adds `controller` to the `edgestack fleet` group.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from fleet.errors import ProtocolError, RolloutError
from fleet.protocol import Command, Release
from fleet.rollout import Rollout, check_command, new_rollout
from fleet.strategy import load_strategy
from fleet.view import render, summary_line

DEFAULT_NATS = "nats://127.0.0.1:4222"


def default_nats() -> str:
    return os.environ.get("EDGESTACK_NATS") or DEFAULT_NATS


async def _connect(url: str, name: str):
    from fleet.transport import NatsFleetBus

    return await NatsFleetBus.connect(url, name=name)


def _nats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default=None, help=f"NATS URL(s), comma-separated (default: $EDGESTACK_NATS, "
                                                     f"else {DEFAULT_NATS})")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "rollout", help="staged rollouts of a model version to the fleet: start, status, pause, resume, ...",
        description="Staged canary rollouts run by `edgestack fleet controller`: cohorts stratified by device class, "
                    "analysis against baselines every interval, automatic rollback.")
    sub = parser.add_subparsers(dest="rollout_command", required=True)
    start = sub.add_parser("start", help="start a rollout of a registered model version (or a Release file)")
    start.add_argument("--strategy", required=True, help="strategy YAML (see specs/rollout.yaml)")
    start.add_argument("--model", help="registered model name (with --version and --registry)")
    start.add_argument("--version", help="semantic version or alias in the registry")
    start.add_argument("--registry", help="registry URI (sqlite:///PATH.db or http://mlflow-server:port; default: "
                                          "EDGESTACK_REGISTRY, else sqlite:///registry/registry.db)")
    start.add_argument("--release", help="a Release JSON file instead of the registry")
    start.add_argument("--id", help="rollout id (default: MODEL-VERSION-UTCTIME)")
    _nats_option(start)
    start.set_defaults(func=cmd_start)
    status = sub.add_parser("status", help="the fleet view of a rollout; without ID, one line per rollout")
    status.add_argument("id", nargs="?")
    status.add_argument("--watch", type=float, metavar="S", help="redraw every S seconds until the rollout ends")
    status.add_argument("--json", action="store_true", help="print the rollout record as JSON")
    _nats_option(status)
    status.set_defaults(func=cmd_status)
    for name, text in (("pause", "stop promoting (analysis and automatic rollback go on)"),
                       ("resume", "continue a paused rollout"),
                       ("promote", "end the current stage now and start the next (the last: complete)"),
                       ("abort", "revert every updated device to its previous version")):
        command = sub.add_parser(name, help=text)
        command.add_argument("id")
        command.add_argument("--reason", help="why (recorded in the rollout's events)")
        command.add_argument("--wait", type=float, default=10.0, metavar="S",
                             help="wait up to S seconds for the controller to apply it (default 10; 0: do not wait)")
        _nats_option(command)
        command.set_defaults(func=cmd_command, command_name=name)
    return parser


def add_fleet_commands(fleet_subparsers) -> argparse.ArgumentParser:
    parser = fleet_subparsers.add_parser(
        "controller", help="run the rollout controller until SIGTERM",
        description="Drive every active rollout: write desired states, read device reports, analyse, promote, "
                    "roll back. One JSON line per event on stderr. Its state lives in NATS: kill it and start "
                    "it again, it resumes.")
    _nats_option(parser)
    parser.add_argument("--registration-refresh", type=float, default=30.0, metavar="S",
                        help="re-read the device registrations every S seconds (default 30)")
    parser.set_defaults(func=cmd_controller)
    return parser


def rollout_id_for(model: str, version: str, now: float) -> str:
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d%H%M%S")
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{model}-{version}-{stamp}")[:64]


def read_release(args: argparse.Namespace) -> Release:
    if args.release:
        try:
            return Release.from_dict(json.loads(Path(args.release).read_text()))
        except ValueError as exc:
            raise ProtocolError(f"{args.release}: not a release ({exc})") from exc
    missing = [f"--{n}" for n in ("model", "version") if not getattr(args, n)]
    if missing:
        raise RolloutError(f"give --release FILE, or --model and --version (missing {', '.join(missing)})")
    from fleet.registry import Registry

    return Registry(args.registry).resolve(args.model, args.version)  # None: EDGESTACK_REGISTRY or the default


async def _load(bus, rollout_id: str) -> Rollout:
    data, _ = await bus.load_rollout(rollout_id)
    if data is None:
        known = ", ".join(await bus.list_rollouts()) or "none"
        raise RolloutError(f"no rollout {rollout_id!r} (known: {known})")
    return Rollout.from_dict(data)


async def start_rollout(bus, rollout_id: str, release: Release, strategy, now: float) -> Rollout:
    """Write a PENDING rollout; RolloutError when the model already has an active one or the id is taken."""
    for other in await bus.list_rollouts():
        data, _ = await bus.load_rollout(other)
        if other == rollout_id:
            raise RolloutError(f"rollout {rollout_id} exists already")
        if data is not None and data.get("release", {}).get("model") == release.model:
            existing = Rollout.from_dict(data)
            if not existing.terminal:
                raise RolloutError(f"model {release.model} has an active rollout {other} ({existing.state.value}); "
                                   f"abort it or wait until it ends")
    rollout = new_rollout(rollout_id, release, strategy, now)
    await bus.save_rollout(rollout_id, rollout.to_dict(), 0)
    return rollout


async def send_command(bus, rollout_id: str, command: str, reason: str | None, wait_s: float,
                       poll_s: float = 0.2) -> str:
    """Check, send and (wait_s > 0) wait for a command; what happened, in words. RolloutError when refused."""
    rollout = await _load(bus, rollout_id)
    check_command(command, rollout.state)
    current = await bus.get_command(rollout_id)
    seq = max(rollout.command_seq, current.seq if current else 0) + 1
    await bus.put_command(rollout_id, Command(command=command, seq=seq, reason=reason))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        rollout = await _load(bus, rollout_id)
        if rollout.command_seq >= seq:
            refused = [e for e in rollout.events if e.get("seq") == seq and e["event"] == "command_refused"]
            if refused:
                raise RolloutError(f"the controller refused {command}: {refused[-1]['reason']}")
            return f"{command} applied: rollout {rollout_id} is {rollout.state.value}, stage {rollout.stage + 1}"
        await asyncio.sleep(poll_s)
    if wait_s <= 0:
        return f"{command} sent to rollout {rollout_id} (seq {seq})"
    return (f"{command} sent to rollout {rollout_id} (seq {seq}) but not applied within {wait_s:g}s: "
            f"is `edgestack fleet controller` running?")


def cmd_start(args: argparse.Namespace) -> int:
    strategy = load_strategy(args.strategy)
    release = read_release(args)
    now = time.time()
    rollout_id = args.id or rollout_id_for(release.model, release.version, now)

    async def go() -> Rollout:
        bus = await _connect(args.nats or default_nats(), "edgestack-rollout-cli")
        try:
            return await start_rollout(bus, rollout_id, release, strategy, now)
        finally:
            await bus.close()
    rollout = asyncio.run(go())
    stages = " -> ".join(f"{s.name} {s.percentage:g}%" for s in strategy.stages)
    print(f"rollout {rollout.id} started: {release.model} {release.version}, {stages}; PENDING until the "
          f"controller picks it up")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    async def go() -> None:
        bus = await _connect(args.nats or default_nats(), "edgestack-rollout-cli")
        try:
            if not args.id:
                ids = await bus.list_rollouts()
                for rollout_id in ids:
                    data, _ = await bus.load_rollout(rollout_id)
                    print(summary_line(Rollout.from_dict(data)) if data else f"{rollout_id} (deleted)")
                if not ids:
                    print("no rollouts")
                return
            while True:
                rollout = await _load(bus, args.id)
                if args.json:
                    print(json.dumps(rollout.to_dict(), indent=1))
                else:
                    if args.watch:
                        print("\033[2J\033[H", end="")
                    print(render(rollout), flush=True)
                if not args.watch or rollout.terminal:
                    return
                await asyncio.sleep(args.watch)
        finally:
            await bus.close()
    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    async def go() -> str:
        bus = await _connect(args.nats or default_nats(), "edgestack-rollout-cli")
        try:
            return await send_command(bus, args.id, args.command_name, args.reason, args.wait)
        finally:
            await bus.close()
    print(asyncio.run(go()))
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from fleet.controller import Controller

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        bus = await _connect(args.nats or default_nats(), "edgestack-controller")
        try:
            await Controller(bus, registration_refresh_s=args.registration_refresh).run(stop)
        finally:
            await bus.close()
    asyncio.run(go())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fleet.rollout_cli rollout ...|fleet controller ...`: these commands without the rest of the CLI."""
    from edgestack.cli import run_parsed

    parser = argparse.ArgumentParser(prog="edgestack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    add_fleet_commands(sub.add_parser("fleet", help="fleet daemons").add_subparsers(dest="fleet_command",
                                                                                     required=True))
    return run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
