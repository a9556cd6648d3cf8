"""`edgestack load`: run the locust load test of the `detect` ensemble headless and summarize it (throughput,
p50/p95/p99, SLO).

Locust runs in its own process (the venv's `locust` executable) on loadtests/locustfile.py, which this module
never imports: gevent's monkey-patching never touches the caller. Its stats CSV and the locustfile's
SOURCE/DEGRADED counts are parsed afterwards.

    edgestack load --images DIR --protocol grpc --users 4 --duration 20 --slo-p99-ms 500
    edgestack load --images DIR --url 127.0.0.1:8001 --protocol grpc --json out/load.json
    python -m loadtests.run ...   (the same command)

Without --url a repository is rendered from the default spec into a temporary folder and a tritonserver
is started on free loopback ports for the run, then stopped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgestack.errors import EdgestackError
from edgestack.inputs import DEFAULT_SPEC, image_folder
from edgestack.server import stop_process_group

# the loadtests package is installed beside this one; its locustfile is handed to locust as a file
LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"
PROTOCOLS = ("grpc", "http", "both")
USER_CLASSES = {"grpc": ["GrpcDetectUser"], "http": ["HttpDetectUser"], "both": ["GrpcDetectUser", "HttpDetectUser"]}
STOP_TIMEOUT_S = 10
# Locust's own start-up and shutdown, on top of the run time and the stop timeout, before we give up on it.
PROCESS_GRACE_S = 60.0


class LoadTestError(EdgestackError):
    """The load test could not be run (bad arguments, locust did not start, no stats were written)."""


@dataclass(frozen=True)
class LoadReport:
    """One load run. Times in milliseconds (locust's approximated percentiles: 2 significant digits)."""

    protocol: str
    users: int
    spawn_rate: float
    duration_s: float
    requests: int
    failures: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    min_ms: float
    max_ms: float
    slo_p99_ms: float | None
    slo_held: bool | None  # p99 <= slo and no failure; None when no SLO was given
    per_protocol: dict[str, dict[str, float]] = field(default_factory=dict)
    results: dict[str, dict[str, int]] = field(default_factory=dict)  # SOURCE edge/cloud and DEGRADED counts
    failure_messages: tuple[str, ...] = ()
    user_errors: int = 0  # exceptions raised in the locustfile outside a request (client set-up, bugs)
    cloud_share: float | None = None

    def slo_met(self, slo_p99_ms: float) -> bool:
        """Whether this run meets a p99 SLO: some requests, none failed, p99 <= slo_p99_ms."""
        return self.requests > 0 and self.failures == 0 and self.user_errors == 0 and self.p99_ms <= slo_p99_ms

    @property
    def passed(self) -> bool:
        """Requests were made, none failed, and the SLO (if any) held."""
        return self.requests > 0 and self.failures == 0 and self.user_errors == 0 and self.slo_held is not False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failure_messages"] = list(self.failure_messages)
        data["passed"] = self.passed
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}

    def table(self) -> str:
        slo = "-" if self.slo_p99_ms is None else f"p99 <= {self.slo_p99_ms:g} ms: {'held' if self.slo_held else 'FAILED'}"
        lines = [
            f"load: {self.protocol}, {self.users} users (spawn {self.spawn_rate:g}/s), {self.duration_s:g} s",
            f"{'protocol':<10}{'requests':>9}{'failures':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        ]
        rows = dict(self.per_protocol)
        if len(rows) != 1:
            rows["total"] = {"requests": self.requests, "failures": self.failures, "throughput_rps": self.throughput_rps,
                             "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms}
        for name, r in rows.items():
            lines.append(f"{name:<10}{int(r['requests']):>9}{int(r['failures']):>9}{r['throughput_rps']:>9.2f}"
                         f"{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['max_ms']:>9.0f}")
        total = self.results.get("total", {})
        if total:
            lines.append(f"results: edge {total.get('edge', 0)}, cloud {total.get('cloud', 0)}, degraded {total.get('degraded', 0)}"
                         f" (low-confidence photos sent: {total.get('low_confidence_sent', 0)})")
        lines.append(f"SLO: {slo}")
        for message in self.failure_messages[:5]:
            lines.append(f"failure: {message}")
        if self.user_errors:
            lines.append(f"locustfile errors outside requests: {self.user_errors}")
        return "\n".join(lines)


# ------------------------------------------------------------------ running locust


def locust_command() -> list[str]:
    """The locust of this interpreter's environment (the venv's executable, else `python -m locust`)."""
    exe = Path(sys.executable).parent / "locust"
    return [str(exe)] if exe.is_file() and os.access(exe, os.X_OK) else [sys.executable, "-m", "locust"]


def _strip_scheme(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


def _float(value: str) -> float:
    return float("nan") if value in ("", "N/A") else float(value)


def _row_summary(row: dict[str, str]) -> dict[str, float]:
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "throughput_rps": _float(row["Requests/s"]),
        "p50_ms": _float(row["50%"]),
        "p95_ms": _float(row["95%"]),
        "p99_ms": _float(row["99%"]),
        "avg_ms": _float(row["Average Response Time"]),
        "min_ms": _float(row["Min Response Time"]),
        "max_ms": _float(row["Max Response Time"]),
    }


def parse_stats_csv(path: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The Aggregated row and the rows per request type (protocol) of locust's <prefix>_stats.csv."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    if total is None:
        raise LoadTestError(f"{path} has no Aggregated row")
    per = {r["Type"]: _row_summary(r) for r in rows if r["Name"] != "Aggregated" and r["Type"]}
    return _row_summary(total), per


def _failure_messages(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ()
    with path.open(newline="") as fh:
        return tuple(f"{r['Method']} {r['Name']}: {r['Error']} (x{r['Occurrences']})" for r in csv.DictReader(fh))


def _user_errors(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(newline="") as fh:
        return sum(int(r["Count"]) for r in csv.DictReader(fh))


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_load(
    target_url_http: str | None,
    target_url_grpc: str | None,
    *,
    users: int,
    spawn_rate: float,
    duration_s: float,
    protocol: str,
    images: Path,
    slo_p99_ms: float | None = None,
    out_json: Path | None = None,
    cloud_share: float | None = None,
    model: str = "detect",
    stop_timeout_s: int = STOP_TIMEOUT_S,
    request_timeout_s: float = 30.0,
    log_dir: Path | None = None,
) -> LoadReport:
    """Run locust headless against the ensemble and return its report.

    protocol: "grpc" (needs target_url_grpc), "http" (needs target_url_http) or "both" (both users, equal weight).
    duration_s is rounded up to whole seconds (locust's --run-time). cloud_share: fraction of requests that
    send a photo the edge is not confident about (None: every photo of the folder equally likely).
    log_dir: keep locust's CSVs and output there (default: a temporary folder, removed).
    """
    if protocol not in PROTOCOLS:
        raise LoadTestError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if users < 1 or spawn_rate <= 0 or duration_s <= 0:
        raise LoadTestError("users must be >= 1, spawn_rate and duration_s > 0")
    if cloud_share is not None and not 0.0 <= cloud_share <= 1.0:
        raise LoadTestError(f"cloud_share must be within 0..1, not {cloud_share}")
    urls = {"grpc": target_url_grpc, "http": target_url_http}
    needed = ("grpc", "http") if protocol == "both" else (protocol,)
    for name in needed:
        if not urls[name]:
            raise LoadTestError(f"protocol {protocol} needs the {name} url (host:port)")
        urls[name] = _strip_scheme(urls[name])
    images = Path(images).expanduser().resolve()
    image_folder(images)

    run_s = max(1, math.ceil(duration_s))
    keep = log_dir is not None
    work = Path(log_dir) if keep else Path(tempfile.mkdtemp(prefix="edgestack-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prefix = work / "locust"
        stats_json = work / "results.json"
        output = work / "locust.log"
        cmd = [
            *locust_command(), "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{run_s}s", "--stop-timeout", str(int(stop_timeout_s)),
            "--host", urls[needed[0]], "--csv", str(prefix), "--loglevel", "WARNING", "--exit-code-on-error", "1",
            "--images", str(images), "--model", model, "--request-timeout", f"{request_timeout_s:g}",
            "--stats-json", str(stats_json),
        ]
        for name in needed:
            cmd += [f"--{name}-url", urls[name]]
        if cloud_share is not None:
            cmd += ["--cloud-share", f"{cloud_share:g}"]
        cmd += USER_CLASSES[protocol]
        # Locust reads LOCUST_* variables and locust.conf from the working directory: neither should steer this run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
        with output.open("wb") as log:
            process = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=run_s + stop_timeout_s + PROCESS_GRACE_S)
            except subprocess.TimeoutExpired:
                raise LoadTestError(f"locust did not finish within {run_s + stop_timeout_s + PROCESS_GRACE_S:.0f} s; "
                                    f"output:\n{_tail(output)}") from None
            finally:
                stop_process_group(process, timeout_s=15)  # locust may have forked workers
        stats_csv = Path(f"{prefix}_stats.csv")
        if returncode not in (0, 1) or not stats_csv.is_file() or not stats_json.is_file():
            raise LoadTestError(f"locust exited with code {returncode} without complete stats; output:\n{_tail(output)}")
        total, per = parse_stats_csv(stats_csv)
        extra = json.loads(stats_json.read_text())
        final = extra.get("locust_total", {})
        if final and final.get("requests") != total["requests"]:
            raise LoadTestError(f"locust's stats CSV is stale: {total['requests']} requests in the CSV, "
                                f"{final.get('requests')} counted at shutdown")
        user_errors = _user_errors(Path(f"{prefix}_exceptions.csv"))
        failures = int(total["failures"])
        requests = int(total["requests"])
        slo_held = None
        if slo_p99_ms is not None:
            slo_held = requests > 0 and failures == 0 and user_errors == 0 and total["p99_ms"] <= slo_p99_ms
        report = LoadReport(
            protocol=protocol, users=users, spawn_rate=spawn_rate, duration_s=float(run_s),
            requests=requests, failures=failures, throughput_rps=total["throughput_rps"],
            p50_ms=total["p50_ms"], p95_ms=total["p95_ms"], p99_ms=total["p99_ms"],
            avg_ms=total["avg_ms"], min_ms=total["min_ms"], max_ms=total["max_ms"],
            slo_p99_ms=slo_p99_ms, slo_held=slo_held, per_protocol=per, results=extra.get("results", {}),
            failure_messages=_failure_messages(Path(f"{prefix}_failures.csv")), user_errors=user_errors,
            cloud_share=cloud_share,
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    return report


# ------------------------------------------------------------------ command line


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="host:port of a running server for --protocol (default: render the spec into a "
                                      "temporary folder and start a tritonserver for the run)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                        help="client protocol; 'both' runs gRPC and HTTP users side by side (needs no --url)")
    parser.add_argument("--users", type=int, default=4, help="concurrent users, each with one request in flight (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="run time in seconds, rounded up (default 20)")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of photos to send")
    parser.add_argument("--cloud-share", type=float, help="fraction of requests sending a photo the edge is not "
                                                          "confident about (flower.jpg, scream.jpg): the cloud path")
    parser.add_argument("--slo-p99-ms", type=float, help="fail unless p99 latency <= this many ms")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--model", default="detect", help="ensemble name (default detect)")
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="spec of the server started without --url")
    parser.add_argument("--server-log", help="with no --url: append the started server's log to this file")


def cmd_load(args: argparse.Namespace) -> int:
    """`edgestack load`: run, print the table, exit 1 on any failed request or a missed SLO."""
    common = dict(users=args.users, spawn_rate=args.spawn_rate, duration_s=args.duration, protocol=args.protocol,
                  images=Path(args.images), slo_p99_ms=args.slo_p99_ms, out_json=Path(args.json) if args.json else None,
                  cloud_share=args.cloud_share, model=args.model)
    if args.url:
        if args.protocol == "both":
            raise LoadTestError("--protocol both needs a server of its own (omit --url): one --url names one endpoint")
        http, grpc = (args.url, None) if args.protocol == "http" else (None, args.url)
        report = run_load(http, grpc, **common)
    else:
        report = _run_with_own_server(Path(args.spec), Path(args.server_log) if args.server_log else None, common)
    print(report.table())
    return 0 if report.passed else 1


def _run_with_own_server(spec_path: Path, server_log: Path | None, common: dict[str, Any]) -> LoadReport:
    from builder.repository import render_repository
    from builder.spec import load_spec
    from edgestack.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="edgestack-load-server-") as tmp:
        repository = render_repository(load_spec(spec_path), Path(tmp) / "model_repository")
        log_path = server_log or Path(tmp) / "tritonserver.log"
        print(f"starting tritonserver on {repository} ...", flush=True)
        with TritonServer(repository, log_path=log_path) as server:
            print(f"tritonserver ready (pid {server.pid}): grpc {server.grpc_url}  http {server.http_url}", flush=True)
            return run_load(server.http_url, server.grpc_url, **common)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `load` on an argparse subparsers object (edgestack's CLI); sets func=cmd_load."""
    parser = subparsers.add_parser(
        "load", help="measure the ensemble under load (locust: throughput, p50/p95/p99, SLO)",
        description="Run locust headless with tritonclient users over gRPC or HTTP against a running server (--url) "
                    "or one started for the run; print throughput and latency percentiles; exit 1 on any failed "
                    "request or a missed --slo-p99-ms.")
    _add_options(parser)
    parser.set_defaults(func=cmd_load)
    return parser

