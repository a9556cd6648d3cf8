"""The fleet's commands on the edgestack CLI: `registry`, `rollout` and the `fleet` group (controller, simulate)."""
from __future__ import annotations


def add_parsers(subparsers) -> None:
    from fleet import registry_cli, rollout_cli, simulate_cli

    registry_cli.add_parser(subparsers)
    rollout_cli.add_parser(subparsers)
    fleet = subparsers.add_parser("fleet", help="fleet daemons and tools: the rollout controller, a simulated fleet",
                                  description="`controller` runs the rollout controller against NATS; `simulate` "
                                              "runs N simulated devices that speak the same subjects and buckets.")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    rollout_cli.add_fleet_commands(fleet_sub)
    simulate_cli.add_commands(fleet_sub)
