"""A server the fleet runs beside itself or its tests (nats-server, mlflow server): one process on loopback in
its own process group, its output appended to a log file, ready when its own health check says so, always
stopped by PID (the whole group: SIGTERM, then SIGKILL if it lingers).

Subclasses give `command()`, `is_ready()`, the error class to raise and, when needed, `environment()` and
`workdir`; `start()` after `stop()` starts the same server again (same ports, same store).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

from edgestack.server import stop_process_group
from fleet.errors import FleetError


class ServiceProcess:
    name = "service"
    error: type[FleetError] = FleetError
    poll_s = 0.2
    start_hint = "port taken?"  # what to suspect when the process exits while starting

    def __init__(self, log_path: Path | str | None = None) -> None:
        self.log_path = Path(log_path) if log_path else None
        self.workdir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.started_pids: list[int] = []  # every process this object started, for checks that all are gone
        self._log: IO | int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None  # inherit

    def is_ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout_s: float = 60.0) -> "ServiceProcess":
        if self.process is not None and self.process.poll() is None:
            return self
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=self.environment(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.started_pids.append(self.process.pid)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise self.error(f"{self.name} exited with code {self.process.returncode} while starting "
                                 f"({self.start_hint}){self._last_log_line()}; log: {self.log_path}")
            if self.is_ready():
                return
            time.sleep(self.poll_s)
        raise self.error(f"{self.name} was not ready within {timeout_s:.0f}s; log: {self.log_path}")

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path else []
        except OSError:
            return ""
        return f": {lines[-1][:300]}" if lines else ""

    def stop(self, timeout_s: float = 15.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout_s)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
