"""The sidecar daemon's command line: `python -m sidecar ...`, and `add_parser` for an `edgestack sidecar` command.

The daemon recovers first (sidecar.state.RECOVERY), then serves the local API (sidecar.api) and, every
--watch-s seconds while idle, checks that Triton runs exactly the committed version (it does not after a
Triton restart: explicit mode starts empty) and recovers again when it does not.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from builder.targets import TARGETS
from fleet.errors import FleetError
from sidecar.state import TERMINAL, State, now_iso


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--repository", required=True, help="the Triton model repository the sidecar updates")
    parser.add_argument("--triton-http", required=True, metavar="HOST:PORT",
                        help="Triton's HTTP endpoint (Triton runs with --model-control-mode=explicit)")
    parser.add_argument("--state-dir", required=True, help="the agent's state, staging and downloads folder")
    parser.add_argument("--trust-dir", required=True, help="the TrustStore folder")
    parser.add_argument("--root", metavar="ROOT_JSON",
                        help="the root.json shipped in the device image: trusted on first start when the trust "
                             "store has none (later roots arrive by rotation: POST /root)")
    parser.add_argument("--port", type=int, default=8010, help="port of the API on 127.0.0.1 (default 8010)")
    parser.add_argument("--detector-model", default="detect_detector")
    parser.add_argument("--ensemble-model", default="detect")
    parser.add_argument("--keep-versions", type=int, default=3, metavar="K", help="good versions kept on disk (>= 2)")
    parser.add_argument("--min-free-bytes", type=int, default=64 << 20, help="disk that must stay free after staging")
    parser.add_argument("--probation-s", type=float, default=60.0, help="probation window after a commit")
    parser.add_argument("--stage", choices=["canary", "ga"], default="canary", help="rollout stage (thresholds)")
    parser.add_argument("--target", choices=TARGETS,
                        help="the build target this device serves (default: the served detector's)")
    parser.add_argument("--device-class", action="append", metavar="CLASS",
                        help="this device's class(es) (default: detected, see `edgestack device-info`)")
    parser.add_argument("--watch-s", type=float, default=10.0,
                        help="check Triton against the committed version every S seconds (0: never)")
    fleet = parser.add_argument_group("fleet (issue #11: staged rollouts over NATS)")
    fleet.add_argument("--nats", metavar="URL", help="NATS server(s) of the fleet, e.g. nats://fleet:4222 "
                       "(comma-separated for a cluster); the daemon then also runs the fleet device client")
    fleet.add_argument("--device-id", help="this device's id in the fleet ([A-Za-z0-9_-], default: the host name)")
    fleet.add_argument("--report-s", type=float, default=10.0, help="report to the fleet every S seconds")
    fleet.add_argument("--triton-metrics", metavar="HOST:PORT",
                       help="Triton's metrics endpoint for latency and error reports (default: none reported)")
    fleet.add_argument("--accuracy-s", type=float, default=60.0,
                       help="check the serving version against its signed expected outputs every S seconds")
    return parser


def _log(**fields: object) -> None:
    sys.stderr.write(json.dumps({"ts": now_iso(), "component": "sidecar", **fields}, default=str) + "\n")
    sys.stderr.flush()


def _keep_in_line(agent, stop: threading.Event, watch_s: float) -> None:
    """Recover at start; then, while idle, recover whenever Triton does not serve the committed version."""
    from sidecar.errors import SidecarError

    first = True
    while first or (watch_s > 0 and not stop.wait(watch_s)):
        try:
            st = agent.store.load()
            stale = first or st is None or st.state not in TERMINAL or (
                agent.control.is_live() and (agent.control.pinned_version() != st.current
                                             or agent.control.ready_versions() != [st.current]))
            if stale and not agent.status()["busy"]:
                agent.recover()
        except SidecarError as exc:
            _log(event="recover_failed", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving its API
            _log(event="recover_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            agent.control.close()
        first = False


def run(args: argparse.Namespace, on_transition: Callable[[State], None] | None = None) -> int:
    """The daemon, until SIGTERM or SIGINT; on_transition goes to the Agent (called after each persisted state)."""
    from sidecar.agent import Agent
    from sidecar.api import SidecarAPI
    from sidecar.errors import SidecarError
    from sidecar.trust import TrustStore

    try:
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        lock = open(Path(args.state_dir) / "daemon.lock", "a")  # noqa: SIM115 - held while the daemon runs
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SidecarError(f"another sidecar daemon owns {args.state_dir}") from None
        trust = TrustStore(Path(args.trust_dir))
        if not trust.initialized and args.root:
            trust.initialize(json.loads(Path(args.root).read_text(encoding="utf-8")))
            _log(event="root_initialized", root=args.root, root_version=trust.root.version)
        if not trust.initialized:
            raise SidecarError(f"trust store {args.trust_dir} has no root.json: start with --root ROOT_JSON")
        agent = Agent(Path(args.repository), args.triton_http, Path(args.state_dir), trust,
                      detector_model=args.detector_model, ensemble_model=args.ensemble_model,
                      keep_versions=args.keep_versions, min_free_bytes=args.min_free_bytes,
                      probation_s=args.probation_s, stage=args.stage, target=args.target,
                      device_classes=_device_classes(args.device_class), on_transition=on_transition)
        api = SidecarAPI(agent, args.port)
        fleet = _fleet_client(args, agent) if getattr(args, "nats", None) else None
    except (SidecarError, FleetError, OSError, ValueError) as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        threading.Thread(target=api.shutdown, daemon=True).start()
        if fleet is not None:
            threading.Thread(target=fleet.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log(event="listening", url=f"http://127.0.0.1:{api.port}", repository=args.repository, triton=args.triton_http)
    threading.Thread(target=_keep_in_line, args=(agent, stop, args.watch_s), name="sidecar-watch", daemon=True).start()
    if fleet is not None:
        fleet.start()
        _log(event="fleet_client", nats=args.nats, device_id=fleet.client.device_id, report_s=args.report_s)
    api.serve_forever()
    if fleet is not None:
        fleet.stop()
    _log(event="stopped")
    return 0


def _fleet_client(args: argparse.Namespace, agent):
    """The fleet device client (fleet.device) beside the same in-process agent, not started yet."""
    import logging
    import re
    import socket

    from fleet.device import DeviceClient, DeviceThread

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device_id = args.device_id or re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    client = DeviceClient(args.nats, device_id, agent, triton_metrics_url=args.triton_metrics,
                          ensemble_model=args.ensemble_model, report_s=args.report_s,
                          state_dir=Path(args.state_dir) / "fleet", accuracy_s=args.accuracy_s)
    return DeviceThread(client)


def _device_classes(names: list[str] | None) -> tuple[str, ...] | None:
    from builder.device_class import DeviceClassError, check_class
    from sidecar.errors import SidecarError

    try:
        return tuple(check_class(n) for n in names) if names else None
    except DeviceClassError as exc:
        raise SidecarError(str(exc)) from exc


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sidecar run` (the daemon, same options as `python -m sidecar`) and the API's client commands
    (sidecar.ctl_cli) on an argparse subparsers object."""
    from sidecar import ctl_cli

    parser = subparsers.add_parser(
        "sidecar", help="the update agent: run the daemon, or ask it for status, install, rollback",
        description="Signed detector bundles installed, gated, swapped and rolled back by a daemon beside Triton. "
                    "`run` starts the daemon (it recovers any interrupted install, then serves a JSON API on "
                    "127.0.0.1); the other commands talk to that API.")
    sub = parser.add_subparsers(dest="sidecar_command", required=True)
    run_parser = sub.add_parser("run", help="run the daemon (as `python -m sidecar`)",
                                description="The sidecar daemon: recovers any interrupted install, then serves a "
                                            "JSON API on 127.0.0.1 (GET /status /versions /history /blocked, POST "
                                            "/install /rollback /unblock /root).")
    add_options(run_parser)
    run_parser.set_defaults(func=run)
    ctl_cli.add_commands(sub)
    return parser
