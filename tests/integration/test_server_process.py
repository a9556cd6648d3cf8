"""A tritonserver killed with SIGKILL leaves its Python backend's shared-memory regions (32 MiB per model
instance) in /dev/shm; TritonServer names them with its own prefix and removes them when it stops."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from edgestack.errors import ServerError
from edgestack.server import TritonServer, remove_shm_regions
from tests.integration.conftest import assert_stopped, render

pytestmark = pytest.mark.integration
SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_a_killed_server_leaves_no_shared_memory(tmp_path):
    server = TritonServer(render(tmp_path), explicit_models=["detect_postprocess"], log_path=tmp_path / "log")
    with server:
        regions = list(SHM.glob(f"{server.shm_prefix}*"))
        assert regions  # the stub's region carries the server's prefix
        pid = server.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(r.exists() for r in regions)  # killed: nothing removed them
    assert_stopped(pid)
    assert not list(SHM.glob(f"{server.shm_prefix}*"))


def test_starting_a_running_server_again_is_refused_and_leaks_nothing(tmp_path):
    server = TritonServer(render(tmp_path), explicit_models=["detect_postprocess"], log_path=tmp_path / "log")
    with server:
        pid = server.pid
        with pytest.raises(ServerError, match="already running"):
            server.start()
        assert server.pid == pid
    assert_stopped(pid)


def test_remove_shm_regions_takes_only_its_prefix(tmp_path):
    for name in ("edgestack_a_1", "edgestack_a_2", "edgestack_b_1", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_shm_regions("edgestack_a_", tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgestack_b_1", "other"]
    assert remove_shm_regions("", tmp_path) == 0
