"""`edgestack fleet simulate`: run N simulated devices against a NATS server until Ctrl-C or --duration.

  edgestack fleet simulate --nats nats://127.0.0.1:4222 --devices 10000 --faults default --seed 7 \
      [--bad-class cuda-sm87[:accuracy|latency|errors|install[=AMOUNT]]] [--duration 300] [--timeline FILE]

Every --progress-every seconds one line: devices up, reports sent (and per second), lies, send errors, and the
devices per version and install state; with --timeline the same as JSON lines (fleet.simulate.timeline_line)
for benchmarks/fleet_scale.py. add_commands(fleet_subparsers) adds `simulate` to the `edgestack fleet` group;
add_parser(subparsers) adds a `fleet` group holding only it.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fleet.simulate import FleetSimulator, make_devices, timeline_line
from fleet.simulate_faults import (BAD_AMOUNTS, BAD_EFFECTS, DEFAULT_CLASS_MIX, DEFAULT_FAULTS, FAULTS, BadClass, ClassMix,
                                   FaultSpec, MetricModel)


def add_commands(fleet_subparsers) -> argparse.ArgumentParser:
    parser = fleet_subparsers.add_parser(
        "simulate", help="run N simulated devices (faults, a bad class) against a NATS server",
        description="Simulated devices that register, watch their desired state (one shared watch), install and "
                    "report like real ones, with faults. Deterministic with --seed.")
    parser.add_argument("--nats", required=True, metavar="URL", help="NATS server, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--devices", type=int, default=1000, help="how many devices (default 1000)")
    parser.add_argument("--faults", default="default",
                        help=f"'none', 'default' ({DEFAULT_FAULTS}) or NAME=FRACTION,... of {', '.join(FAULTS)}")
    parser.add_argument("--class-mix", default=DEFAULT_CLASS_MIX, help=f"CLASS=SHARE,... (default {DEFAULT_CLASS_MIX})")
    parser.add_argument("--bad-class", metavar="CLASS[:EFFECT[=AMOUNT]]",
                        help=f"the update is bad on this class; EFFECT one of {', '.join(BAD_EFFECTS)} (accuracy), "
                             f"AMOUNT: fidelity lost, latency factor or error percent (default {BAD_AMOUNTS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=5.0, help="report interval in seconds (default 5)")
    parser.add_argument("--install-s", type=float, default=2.0, help="simulated install duration (default 2 s)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)")
    parser.add_argument("--prefix", default="sim", help="device ids are PREFIX-000000... (default sim)")
    parser.add_argument("--model", default="detect_detector", help="the model the devices serve")
    parser.add_argument("--progress-every", type=float, default=5.0, metavar="S", help="progress line period")
    parser.add_argument("--timeline", metavar="FILE", help="append one JSON snapshot per progress period here")
    parser.set_defaults(func=cmd_simulate)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    fleet = subparsers.add_parser("fleet", help="fleet tools")
    add_commands(fleet.add_subparsers(dest="fleet_command", required=True))
    return fleet


def cmd_simulate(args: argparse.Namespace) -> int:
    return asyncio.run(simulate(args))


def _progress(snapshot: dict[str, Any], started: float, reports_before: int, period: float) -> str:
    stats = snapshot["stats"]
    rate = (stats["reports"] - reports_before) / period if period > 0 else 0.0
    states = "  ".join(f"{key.replace('|', ' ')} {count}" for key, count in snapshot["by_version_state"].items())
    return (f"[{time.monotonic() - started:7.1f}s] up {snapshot['up']}/{snapshot['devices']}  reports "
            f"{stats['reports']} ({rate:.0f}/s)  lies {stats['lies']}  send errors {stats['send_errors']}  "
            f"restarts {stats['restarts']}  |  {states}")


async def simulate(args: argparse.Namespace) -> int:
    from fleet.transport import NatsFleetBus

    faults, mix = FaultSpec.parse(args.faults), ClassMix.parse(args.class_mix)
    bad = BadClass.parse(args.bad_class) if args.bad_class else None
    devices = make_devices(args.devices, args.seed, faults, mix, prefix=args.prefix, model=args.model)
    counts = ", ".join(f"{name} {count}" for name, count in mix.counts(args.devices).items())
    print(f"{args.devices} simulated devices ({counts}); faults: {faults.describe()}; "
          f"bad class: {bad or 'none'}; seed {args.seed}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration > 0:
        loop.call_later(args.duration, stop.set)
    bus = await NatsFleetBus.connect(args.nats, name=f"simulator-{args.prefix}")
    timeline = Path(args.timeline).open("a", encoding="utf-8") if args.timeline else None
    try:
        sim = FleetSimulator(bus, devices, interval_s=args.interval, install_s=args.install_s, faults=faults,
                             metrics=MetricModel(bad=bad))
        started = time.monotonic()
        await sim.start()
        print(f"registered {sim.stats.registrations} devices in {time.monotonic() - started:.1f}s "
              f"({sim.stats.send_errors} errors)", flush=True)
        last = {"at": time.monotonic(), "reports": 0}

        def on_tick() -> None:
            now = time.monotonic()
            if now - last["at"] < args.progress_every:
                return
            snapshot = sim.snapshot()
            print(_progress(snapshot, started, last["reports"], now - last["at"]), flush=True)
            if timeline is not None:
                timeline.write(timeline_line(snapshot) + "\n")
                timeline.flush()
            last.update(at=now, reports=snapshot["stats"]["reports"])

        await sim.run(stop, on_tick=on_tick)
        snapshot = sim.snapshot()
        if timeline is not None:
            timeline.write(timeline_line(snapshot) + "\n")
        print("final: " + _progress(snapshot, started, last["reports"], time.monotonic() - last["at"]), flush=True)
    finally:
        if timeline is not None:
            timeline.close()
        await bus.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgestack")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - one line for the operator, not a traceback
        from backends.errors import EdgestackError

        if not isinstance(error, EdgestackError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
