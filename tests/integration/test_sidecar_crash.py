"""Crash safety: the sidecar daemon is SIGKILLed right after it persisted each state of an install, then
started again; recover() must leave the device serving the old or the new version (never nothing, never an
unverified one), a consistent persisted state, and no half-staged folder.

The session's shared sidecar tritonserver (explicit mode, tests/integration/sidecar_support.py) for the whole
table, reset to v1 between rows. The daemon to kill runs as
`python -m tests.integration.sidecar_pausing_daemon --pause-at STATE`: the product's daemon with an
on_transition callback that creates <state_dir>/paused-<STATE> and blocks; it recovers as `python -m sidecar`.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgestack.server import free_port
from sidecar.bundle import create_bundle
from sidecar.ctl_cli import call
from sidecar.keys import generate_key
from sidecar.state import TERMINAL, State, StateStore
from sidecar.trust import TrustStore, make_root, sign
from tests.conftest import ROOT
from tests.integration.sidecar_support import (DETECTOR, DOG, EXPIRES, SidecarEnv, detect_dog,
                                               expected_outputs, leftovers, make_bundle, make_variant)
from tests.loop_support import wait_for

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60
SETTLE_TIMEOUT_S = 120

# state the daemon is killed in -> the version the device must serve after recovery
TABLE = [
    ("VERIFYING", 1),  # discard: nothing was trusted or staged
    ("STAGING", 1),  # unstage: the half-staged folder goes
    ("LOADING", 1),  # rollback: v2 may be half loaded and was never verified
    ("HEALTH_GATE", 1),  # rollback: v2 is loaded beside v1 but did not pass the gate
    ("COMMITTING", 2),  # finish the commit: the gate had passed
    ("PROBATION", 2),  # restart probation on the committed v2
]


@pytest.fixture(scope="module")
def crash_env(sidecar_env: SidecarEnv) -> SidecarEnv:
    """The shared server serving v1; the row's bundle is its good v2 (bundles["same"])."""
    sidecar_env.reset_to_v1()
    return sidecar_env


class Daemon:
    def __init__(self, env: SidecarEnv, row: Path, pause_at: str | None, *options: str):
        self.port = free_port()
        entry = ["tests.integration.sidecar_pausing_daemon", "--pause-at", pause_at] if pause_at else ["sidecar"]
        self.log = open(row / f"daemon-{pause_at or 'recover'}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", *entry, "--repository", str(env.repository), "--triton-http",
             env.server.http_url, "--state-dir", str(row / "state"), "--trust-dir", str(row / "trust"),
             "--port", str(self.port), "--probation-s", "1", "--watch-s", "0", *options],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        return call(f"http://127.0.0.1:{self.port}", method, path, body)

    def wait_settled(self, timeout_s: float) -> dict:
        """The API answers, nothing runs, and the state is terminal."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"daemon exited with {self.process.returncode}: see {self.log.name}"
            try:
                _, last = self.request("GET", "/status")
                if not last["busy"] and State(last["state"]) in TERMINAL:
                    return last
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the daemon did not settle in {timeout_s}s; last status {last}; see {self.log.name}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


def _wait_for(path: Path, daemon: Daemon, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert daemon.process.poll() is None, f"daemon exited before {path.name}: see {daemon.log.name}"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout_s}s: see {daemon.log.name}"
        time.sleep(0.1)


@pytest.mark.parametrize("pause_at, serves", TABLE, ids=[row[0] for row in TABLE])
def test_sigkill_in_each_state_recovers_to_a_served_verified_version(crash_env, tmp_path, pause_at, serves):
    env, control = crash_env, crash_env.control
    env.reset_to_v1()
    env.keys.trust_store(tmp_path / "trust")
    model_dir = env.repository / DETECTOR

    daemon = Daemon(env, tmp_path, pause_at)
    try:
        daemon.wait_settled(START_TIMEOUT_S)
        assert daemon.request("POST", "/install", {"bundle": str(env.bundles["same"])})[0] == 202
        _wait_for(tmp_path / "state" / f"paused-{pause_at}", daemon, SETTLE_TIMEOUT_S)
        if pause_at == "STAGING":  # killed mid-copy: a partial temp folder and a partial numbered folder
            (model_dir / ".staging-2" / "backends").mkdir(parents=True)
            (model_dir / "2").mkdir()
            (model_dir / "2" / "model.py").write_text("# half written")
    finally:
        daemon.kill()
    assert StateStore(tmp_path / "state" / "state.json").load().state == State(pause_at)
    assert "dog" in detect_dog(env.server.grpc_url), "the device stopped serving while the agent was down"

    daemon = Daemon(env, tmp_path, None)  # recover() runs at start
    try:
        status = daemon.wait_settled(SETTLE_TIMEOUT_S)
        code, versions = daemon.request("GET", "/versions")
        _, history = daemon.request("GET", "/history")
    finally:
        assert daemon.stop() == 0

    # the persisted state: terminal, committed version on disk, nothing half done
    state = StateStore(tmp_path / "state" / "state.json").load()
    assert state.state in TERMINAL and state.current == serves, status
    assert status["current"] == serves and code == 200 and versions["current"] == serves
    assert versions["serving"] == serves and versions["loaded"] == [serves], versions
    assert (model_dir / str(serves)).is_dir()
    on_disk = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert set(on_disk) <= set(state.committed) and on_disk == ([1] if serves == 1 else [1, 2]), on_disk
    assert leftovers(env.repository) == [] and not (tmp_path / "state" / "staging").exists()
    recovered = [e for e in history if e["event"] == "recover"]
    assert recovered and recovered[-1]["found"] == pause_at, history[-5:]

    # the device: the ensemble answers, pinned to that version, which is the one loaded and counting
    assert control.pinned_version() == serves and control.ready_versions() == [serves]
    before = control.statistics(serves).success_count
    assert "dog" in detect_dog(env.server.http_url, "http")
    # Triton counts a request when it is released, which can be just after the client has its response.
    wait_for(lambda: control.statistics(serves).success_count == before + 1, 10.0,
             f"v{serves} to count the request")
    trusted = TrustStore(tmp_path / "trust").trusted_version(DETECTOR)
    if serves == 2:
        assert state.state == State.DONE and state.committed == [1, 2] and trusted == 2
    else:
        assert state.committed == [1] and trusted is None, "an unverified version raised the trust floor"
        if pause_at in ("LOADING", "HEALTH_GATE"):
            rolled = [e for e in history if e["event"] == "rolled_back"]
            assert state.state == State.FAILED and rolled and "agent restarted" in rolled[-1]["reason"]
            assert rolled[-1]["kind"] == state.failure_kind == "transient" and state.bad_bundles == {}, rolled[-1]
        else:
            assert state.state == State.IDLE and "interrupted" in state.reason

    if pause_at == "HEALTH_GATE":  # the crash said nothing against the bundle: it installs once the agent is back
        daemon = Daemon(env, tmp_path, None)
        try:
            daemon.wait_settled(START_TIMEOUT_S)
            code, status = call(f"http://127.0.0.1:{daemon.port}", "POST", "/install",
                                {"bundle": str(env.bundles["same"]), "wait": True}, SETTLE_TIMEOUT_S)
        finally:
            assert daemon.stop() == 0
        assert code == 200 and status["state"] == "DONE" and status["committed"] == [1, 2], status
        assert control.pinned_version() == 2 and control.ready_versions() == [2]
        assert "dog" in detect_dog(env.server.grpc_url)


# --- the daemon's API: install from a URL, garbage collection, Triton restart, manual rollback -------------

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.25)


def ctl(capsys, api: str, *argv: str) -> tuple[int, object]:
    """`edgestack sidecar ...` in this process: (exit code, the JSON it printed)."""
    from edgestack.cli import main

    code = main(["sidecar", *argv, "--api", api])
    return code, json.loads(capsys.readouterr().out)


def test_daemon_api_cli_url_and_delta_install_gc_triton_restart_and_manual_rollback(crash_env, tmp_path, capsys):
    """Last in this module: it leaves the device on v3 (v1 garbage-collected). v2 comes from a registry URL
    through the API, v3 is a delta bundle against v2 installed with `edgestack sidecar install` and rolled
    back; then the keys are rotated and a bundle signed with the new keys installs, one with the old does not."""
    env, control = crash_env, crash_env.control
    env.reset_to_v1()
    env.keys.trust_store(tmp_path / "trust")
    model_dir = env.repository / DETECTOR
    retrained = make_variant(env.variants / "same", tmp_path / "v3", "retrained")
    v3 = create_bundle(retrained, tmp_path / "v3.bundle", model_name=DETECTOR, model_version="1.3.0", target="cpu",
                       metadata_version=3, keys=env.keys.bundle, expires=EXPIRES,
                       expected_outputs=expected_outputs(env.server, [DOG]), base_dir=env.variants / "same",
                       base_model_version="1.2.0")
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(env.tmp)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    daemon = Daemon(env, tmp_path, None, "--keep-versions", "2", "--watch-s", "1")
    try:
        daemon.wait_settled(START_TIMEOUT_S)
        assert daemon.request("POST", "/install", {})[0] == 400
        assert daemon.request("GET", "/nothing")[0] == 404
        v2 = env.bundles["same"]
        digest = hashlib.sha256(v2.read_bytes()).hexdigest()
        url = f"http://127.0.0.1:{files.server_address[1]}/{v2.name}"
        code, status = daemon.request("POST", "/install", {"url": url, "sha256": digest,
                                                            "size": v2.stat().st_size, "wait": True})
        assert code == 200 and status["state"] == "DONE" and status["committed"] == [1, 2], status
        _, history = daemon.request("GET", "/history")
        assert "DOWNLOADING" in [e["state"] for e in history]
        api = f"http://127.0.0.1:{daemon.port}"
        code, status = ctl(capsys, api, "install", str(v3))
        assert code == 0 and status["state"] == "DONE" and status["committed"] == [2, 3], status
        assert (model_dir / "3" / "model.onnx").read_bytes() == (retrained / "model.onnx").read_bytes()
        code, history = ctl(capsys, api, "history", "--last", "30")
        verified = [e for e in history if e["event"] == "verified"][-1]
        assert code == 0 and verified["base_version"] == "1.2.0" and verified["delivery"]["model.py"] == "unchanged"
        assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["2", "3"], "v1 not collected"

        control.close()
        env.server.stop()
        env.server.start()  # explicit mode, empty: the daemon's watch restores v3
        versions = _wait_until(lambda: (lambda v: v if v["serving"] == 3 and v["loaded"] == [3] else None)(
            daemon.request("GET", "/versions")[1]), 60, "restore after the Triton restart")
        assert versions["current"] == 3 and versions["kept"] == [2, 3]
        assert "dog" in detect_dog(env.server.grpc_url)

        code, status = ctl(capsys, api, "rollback", "--reason", "operator saw false alarms")
        assert code == 0 and status["state"] == "FAILED" and status["current"] == 2, status
        assert control.pinned_version() == 2 and control.ready_versions() == [2]
        assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == ["2"]
        _, history = daemon.request("GET", "/history")
        rolled = [e for e in history if e["event"] == "rolled_back"][-1]
        assert rolled["bad"] and rolled["bad_version"] == 3 and "operator saw false alarms" in rolled["reason"]
        code, blocked = ctl(capsys, api, "blocked")
        assert code == 0 and [b["sha256"] for b in blocked] == [rolled["bundle_sha256"]], blocked
        code, answer = ctl(capsys, api, "unblock", blocked[0]["sha256"][:10], "--reason", "alarms were the camera's")
        assert code == 0 and answer["sha256"] == blocked[0]["sha256"], answer
        assert ctl(capsys, api, "blocked") == (0, [])
        assert ctl(capsys, api, "history", "--last", "1")[1][0]["reason"] == "alarms were the camera's"
        code, answer = ctl(capsys, api, "unblock", blocked[0]["sha256"][:10], "--reason", "twice")
        assert code == 1 and answer["type"] == "BlocklistError", answer
        code, answer = ctl(capsys, api, "rollback", "--reason", "again")
        assert code == 3 and "only committed version" in answer["error"], answer  # nothing older is kept
        code, versions = ctl(capsys, api, "versions")
        assert code == 0 and versions["current"] == 2 and versions["serving"] == 2

        # key rotation: root v2 (signed by the old and the new root keys) through `edgestack sidecar root`
        new_root, new_bundle = [generate_key()], [generate_key()]
        root_v2 = sign(make_root(version=2, expires=EXPIRES, root_keys=new_root, root_threshold=1,
                                 bundle_keys=new_bundle, bundle_threshold=1), env.keys.root + new_root)
        (tmp_path / "root-v2.json").write_text(json.dumps(root_v2))
        code, answer = ctl(capsys, api, "root", str(tmp_path / "root-v2.json"))
        assert code == 0 and answer["root_version"] == 2, answer
        assert TrustStore(tmp_path / "trust").root.version == 2, "the rotation was not persisted"
        assert ctl(capsys, api, "root", str(tmp_path / "root-v2.json"))[0] == 1, "the same root twice"
        old_keys = make_bundle(env.variants / "same", tmp_path / "old-keys.bundle", env.keys, [], 4)
        code, answer = ctl(capsys, api, "install", str(old_keys))
        assert code == 1 and answer["type"] == "SignatureError", answer
        rotated = create_bundle(env.variants / "same", tmp_path / "new-keys.bundle", model_name=DETECTOR,
                                model_version="1.5.0", target="cpu", metadata_version=5, keys=new_bundle,
                                expires=EXPIRES, expected_outputs=expected_outputs(env.server, [DOG]))
        code, status = ctl(capsys, api, "install", str(rotated))
        assert code == 0 and status["state"] == "DONE" and status["committed"] == [2, 3], status
        assert "dog" in detect_dog(env.server.http_url, "http")
    finally:
        files.shutdown()
        files.server_close()
        assert daemon.stop() == 0
