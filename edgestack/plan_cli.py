"""`edgestack plan`: requirements -> hardware tier, precision, batch, expected FPS, power and battery hours.

Prints every tier x precision (plans that meet the requirements first, by average power), then the what-ifs for
the best plan (lower clock, INT8/INT4, smaller backbone). Figures from the tiers' datasheets are marked quoted,
this device's numbers (--measured-fps/--measured-watts, e.g. from `edgestack tune` and `edgestack bench`)
measured, a --power-w draw given. See edgestack/plan.py for the model and its assumptions.
"""
from __future__ import annotations

import argparse
import json

from edgestack.plan import (FIXTURE_DETECTOR_GMACS, SMALLER_BACKBONE_GMACS, TIERS, Plan, PlanError, Requirements,
                            plan, tier, what_ifs)


def _row(label: str, p: Plan) -> str:
    hours = "-" if p.battery_h is None else f"{p.battery_h:.1f}"
    if p.active_w != p.active_w:  # NaN: this device without a power reading
        return (f"{label:<34}{p.precision:<6}{p.batch:>5}{p.fps:>10.1f}{p.p99_ms:>9.0f}{'-':>9}{'-':>10}{hours:>11}  "
                f"{p.source:<9}" + ("yes" if p.meets else "no: " + "; ".join(p.why_not)))
    verdict = "yes" if p.meets else "no: " + "; ".join(p.why_not)
    return (f"{label:<34}{p.precision:<6}{p.batch:>5}{p.fps:>10.1f}{p.p99_ms:>9.0f}{p.active_w:>9.2f}"
            f"{p.joules_per_inference:>10.4f}{hours:>11}  {p.source:<9}{verdict}")


HEADER = (f"{'tier':<34}{'prec':<6}{'batch':>5}{'FPS':>10}{'p99 ms':>9}{'W':>9}{'J/inf':>10}{'battery h':>11}  "
          f"{'figures':<9}meets")


def cmd_plan(args: argparse.Namespace) -> int:
    req = Requirements(fps=args.fps, p99_ms=args.p99_ms, power_w=args.power_budget_w, battery_mah=args.battery_mah,
                       battery_v=args.battery_volts, duty_cycle=args.duty_cycle, gmacs=args.gmacs)
    tiers = tuple(tier(n) for n in args.tiers.split(",")) if args.tiers else TIERS
    if args.measured_watts is not None and args.measured_fps is None:
        raise PlanError("measured_watts: needs --measured-fps too")
    measured = (args.measured_fps, args.measured_watts) if args.measured_fps else None
    precisions = tuple(p.strip() for p in args.precision.split(",")) if args.precision else None
    plans = plan(req, tiers, power_w=args.power_w, measured=measured, precisions=precisions)
    if not plans:
        raise PlanError(f"precision: none of {args.precision} is offered by tier(s) {args.tiers}")
    best = plans[0]
    ifs = what_ifs(req, best, power_w=args.power_w, clock=args.clock) if best.meets or args.power_w else []
    if args.json:
        print(json.dumps({"requirements": vars(req), "plans": [p.to_dict() for p in plans],
                          "what_ifs": [{"what_if": w, **p.to_dict()} for w, p in ifs]}, indent=2))
        return 0 if best.meets else 1
    duty = "always on" if req.duty_cycle == 1 else f"duty cycle {req.duty_cycle:.0%}"
    print(f"requirements: {req.fps:g} FPS, p99 {req.p99_ms or '-'} ms, power budget {req.power_w or '-'} W, "
          f"battery {req.battery_mah or '-'} mAh at {req.battery_v or '-'} V, {duty}, {req.gmacs:g} GMACs/inference")
    if args.power_w:
        print(f"active draw given: {args.power_w:g} W (battery h = mAh / 1000 x V / W)")
    print(HEADER)
    for p in plans:
        print(_row(f"{p.tier} ({tier(p.tier).target or 'no target'})" if p.tier != "this-device" else p.tier, p))
    if not best.meets:
        print("\nno tier meets the requirements")
        return 1
    print(f"\nplan: {best.tier} at {best.precision}, batch {best.batch}: {best.fps:.1f} FPS expected, "
          f"p99 ~{best.p99_ms:.0f} ms, {best.active_w:.2f} W active"
          + (f", battery {best.battery_h:.1f} h" if best.battery_h is not None else ""))
    if ifs:
        print("\nwhat if (same tier):")
        print(HEADER.replace("tier", "what if", 1))
        for label, p in ifs:
            print(_row(label, p))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="requirements -> hardware tier, precision, batch, FPS, power, battery hours",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--fps", type=float, default=10.0, help="required frames per second (default: 10)")
    parser.add_argument("--p99-ms", type=float, help="required p99 latency")
    parser.add_argument("--power-budget-w", type=float, help="most watts the device may draw")
    parser.add_argument("--battery-mah", type=float, help="battery capacity (with --battery-volts)")
    parser.add_argument("--battery-volts", type=float, help="battery voltage (with --battery-mah)")
    parser.add_argument("--duty-cycle", type=float, default=1.0, help="share of time active (default 1.0: always on)")
    parser.add_argument("--power-w", type=float, help="given active draw for every plan (e.g. 17 for the battery "
                                                      "example) instead of the tiers' envelope model")
    parser.add_argument("--gmacs", type=float, default=FIXTURE_DETECTOR_GMACS,
                        help="GMACs per inference (default: the fixture detector's, measured: %(default)s)")
    parser.add_argument("--clock", type=float, default=0.7, help="clock share for the lower-clock what-if")
    parser.add_argument("--tiers", help=f"comma list of tiers (default all: {', '.join(t.name for t in TIERS)})")
    parser.add_argument("--precision", help="comma list of precisions to consider (fp32, fp16, int8, int4)")
    parser.add_argument("--measured-fps", type=float, help="this device's measured img/s (edgestack tune)")
    parser.add_argument("--measured-watts", type=float, help="this device's measured watts (edgestack bench)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=cmd_plan, small_gmacs=SMALLER_BACKBONE_GMACS)
    return parser
