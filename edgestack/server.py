"""Start and stop a real tritonserver (the binary the nvidia-pytriton wheel ships), no Docker needed.

The Python backend's stub must match the running Python, so the backend folder is assembled once
per environment: the wheel's backend library plus the stub for this interpreter.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

from edgestack.errors import ServerError


PYTHON_SHM_DEFAULT_BYTES = 32 * 2**20
PYTHON_SHM_GROWTH_BYTES = 16 * 2**20


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    library_dir: Path

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.library_dir), env.get("LD_LIBRARY_PATH", "")) if p)
        # The stub runs the first python3 on PATH: this environment's, with numpy < 2 and the backends' packages.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env


def find_triton() -> TritonInstall:
    """Locate the wheel's tritonserver and prepare a backend folder with the stub for this Python."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("nvidia-pytriton is not installed: run the README's setup (make setup)") from exc
    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the pytriton wheel has no Python-backend stub for Python {version}")
    backends = Path(sys.prefix) / "share" / "edgestack" / f"triton-backends-py{version}"
    python_dir = backends / "python"
    if not (python_dir / "triton_python_backend_stub").is_file():
        python_dir.mkdir(parents=True, exist_ok=True)
        for item in (dist / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python_dir / item.name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return TritonInstall(dist / "bin" / "tritonserver", backends, libs)


def stop_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the group a `start_new_session=True` process leads, SIGKILL it if it lingers, then
    SIGKILL whatever of the group is left (children of a crashed leader share its group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 5.0  # the killed members (a crashed leader's stubs) take a moment to go
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)


def remove_shm_regions(prefix: str, shm_dir: Path = Path("/dev/shm")) -> int:
    """Remove the shared-memory files named prefix* (a stopped server's); returns how many were removed."""
    removed = 0
    for path in shm_dir.glob(f"{glob.escape(prefix)}*") if prefix and shm_dir.is_dir() else ():
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TritonServer:
    """One tritonserver process on loopback ports; a context manager that always stops it by PID."""

    repository: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    explicit_models: Sequence[str] | None = None  # None: load everything (mode none); else explicit mode
    log_path: Path | None = None
    extra_args: Sequence[str] = ()
    address: str = "127.0.0.1"
    process: subprocess.Popen | None = field(default=None, init=False)
    _log: IO | None = field(default=None, init=False)
    # The Python backend's shared-memory regions (32 MiB per model instance) are named with this prefix, so those of
    # a server that was killed (crash recovery, a hung stop) are removed after it instead of filling /dev/shm.
    shm_prefix: str = field(default_factory=lambda: f"edgestack_{secrets.token_hex(6)}_", init=False)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backend_dir}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            "--allow-metrics=true",
            # p50/p99 per model for the fleet's device reports (fleet.triton_metrics)
            "--metrics-config=summary_latencies=true",
            "--exit-timeout-secs=10",
            "--log-info=true",
            # Python-backend tensors travel through shared memory; a region that starts small grows
            # by mmap on every large tensor (a 512x512x3 float32 image is 3 MiB).
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.explicit_models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.explicit_models]
        return cmd + list(self.extra_args)

    def start(self, timeout_s: float = 120.0, should_stop: Callable[[], bool] = lambda: False) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            raise ServerError(f"tritonserver (pid {self.process.pid}) is already running; stop it first")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist; run `edgestack build` first")
        install = find_triton()
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(install), env=install.environment(), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout_s, should_stop)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not should_stop():
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting; log: {self.log_path}")
            if self.is_ready():
                return
            time.sleep(0.25)
        if should_stop():
            return
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f}s; log: {self.log_path}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group (server and stubs), SIGKILL it if it lingers; then remove the shared
        memory regions a killed server leaves behind."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, timeout_s)
            remove_shm_regions(self.shm_prefix)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
