"""Start and stop a real MLflow tracking server that proxies artifacts: the registry's server mode.

One `mlflow server` process (this environment's MLflow, one uvicorn worker) on 127.0.0.1, in its own process
group, with --serve-artifacts so clients upload and devices download bundles through
<url>/api/2.0/mlflow-artifacts/artifacts/<path> (Range requests honoured for a local destination). Its
backend store is sqlite:///PATH or postgresql://user@host:port/db, its artifacts destination a folder or
s3://bucket/prefix (S3 credentials and MLFLOW_S3_ENDPOINT_URL come from the environment). Ready means GET
/health answers. Telemetry and the server's job runner (a second process tree that fleet use does not need)
are switched off; the server's working folder is `workdir` (a temporary folder unless given), so nothing lands
in the caller's folder. The equivalent command, for compose or a service unit, is command() (docs/REGISTRY.md).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Sequence

from edgestack.server import free_port, stop_process_group
from fleet.errors import RegistryError
from fleet.registry import quiet_mlflow_environment


def destination_uri(destination: Path | str) -> str:
    """A folder as an absolute file:// URI (created); anything with a scheme (s3://...) as given."""
    text = str(destination)
    if "://" in text:
        return text
    folder = Path(text).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


class MlflowServer:
    """An `mlflow server --serve-artifacts` on loopback; a context manager that always stops it by PID."""

    def __init__(self, backend_store_uri: str, artifacts_destination: Path | str, port: int = 0, *,
                 host: str = "127.0.0.1", workdir: Path | str | None = None, log_path: Path | str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.host = host
        self.port = port or free_port()
        self.workdir = Path(workdir) if workdir else None
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self._log: IO | int | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                "--serve-artifacts", "--artifacts-destination", destination_uri(self.artifacts_destination),
                "--host", self.host, "--port", str(self.port), "--workers", "1", *self.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        quiet_mlflow_environment(env)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def start(self, timeout_s: float = 120.0) -> "MlflowServer":
        if self.process is not None and self.process.poll() is None:
            return self
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgestack-mlflow-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=self.environment(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RegistryError(f"mlflow server exited with code {self.process.returncode} while starting "
                                    f"(port {self.port} taken? backend {self.backend_store_uri} unreachable?)"
                                    f"{self._last_log_line()}; log: {self.log_path}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise RegistryError(f"mlflow server was not ready within {timeout_s:.0f}s on {self.url}; log: {self.log_path}")

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path else []
        except OSError:
            return ""
        return f": {lines[-1][:300]}" if lines else ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group (mlflow, uvicorn and its worker), SIGKILL it if it lingers."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout_s)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.workdir = None, None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
