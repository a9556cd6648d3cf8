"""Fleet test support: real nats-server fixtures (function- and module-scoped) and a check that a process is gone.

    from tests.fleet_support import nats_server, nats_server_module, assert_gone  # noqa: F401 (fixtures)

Each fixture starts its own `nats-server -js` on free loopback ports with a store in the test's tmp folder,
yields the fleet.nats_server.NatsServer (stop() and start() it again to simulate an outage: same port, same
store) and stops it by PID afterwards, failing the test when anything of its process group is left.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from fleet.nats_server import NatsServer


def assert_gone(pid: int | None, timeout_s: float = 10.0) -> None:
    """The process group `pid` leads has no process left (polled up to timeout_s, then killed and failed)."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    pytest.fail(f"processes of group {pid} were still running after stop()")


def _serve(folder: Path) -> Iterator[NatsServer]:
    server = NatsServer(folder / "jetstream", log_path=folder / "nats-server.log")
    with server:
        yield server
    for pid in server.started_pids:  # every restart's process too
        assert_gone(pid)


@pytest.fixture
def nats_server(tmp_path) -> Iterator[NatsServer]:
    """A NATS server with JetStream for one test."""
    yield from _serve(tmp_path)


@pytest.fixture(scope="module")
def nats_server_module(tmp_path_factory) -> Iterator[NatsServer]:
    """A NATS server with JetStream shared by a test module (tests must use their own keys or device ids)."""
    yield from _serve(tmp_path_factory.mktemp("nats"))


@pytest.fixture(scope="session")
def nats_server_session(tmp_path_factory) -> Iterator[NatsServer]:
    """A NATS server with JetStream shared by the whole session."""
    yield from _serve(tmp_path_factory.mktemp("nats-session"))
