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
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from edgestack.server import free_port
from fleet.errors import RegistryError
from fleet.registry import quiet_mlflow_environment
from fleet.service_process import ServiceProcess


def destination_uri(destination: Path | str) -> str:
    """A folder as an absolute file:// URI (created); anything with a scheme (s3://...) as given."""
    text = str(destination)
    if "://" in text:
        return text
    folder = Path(text).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


class MlflowServer(ServiceProcess):
    """An `mlflow server --serve-artifacts` on loopback; a context manager that always stops it by PID."""

    name = "mlflow server"
    error = RegistryError
    start_hint = "port taken? backend store unreachable?"

    def __init__(self, backend_store_uri: str, artifacts_destination: Path | str, port: int = 0, *,
                 host: str = "127.0.0.1", workdir: Path | str | None = None, log_path: Path | str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(log_path)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.host = host
        self.port = port or free_port()
        self.workdir = Path(workdir) if workdir else None
        self.extra_args = tuple(extra_args)
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgestack-mlflow-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().start(timeout_s)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group (mlflow, uvicorn and its worker), SIGKILL it if it lingers."""
        super().stop(timeout_s)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.workdir = None, None
