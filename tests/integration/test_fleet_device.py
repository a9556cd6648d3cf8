"""The fleet device client in a real sidecar daemon (`python -m sidecar ... --nats`) beside a real tritonserver,
with a real nats-server and bundles fetched over HTTP from a `python -m http.server` process: it registers,
installs what its desired state asks, reports the new semver with Triton's p50/p99 and the accuracy of the signed
expected outputs, rolls back when asked, and a NATS outage fails no client request while reports resume after."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from builder.repository import render_repository, target_for
from edgestack.server import free_port
from fleet.protocol import BundleRef, DesiredState, Report
from fleet.transport import NatsFleetBus
from tests import synthetic_detector
from tests.fleet_support import assert_gone, nats_server_module  # noqa: F401 - fixture
from tests.integration.conftest import QUEUE_DELAY_US
from tests.integration.sidecar_support import Load, SidecarEnv, detect_dog, running_sidecar_env

pytestmark = pytest.mark.integration

DEVICE = "cam-1"


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert_gone(process.pid)
    return process.returncode


def _wait_http(url: str, process: subprocess.Popen, log: Path, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{url} did not answer:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[SidecarEnv]:
    tmp = tmp_path_factory.mktemp("fleet-device")
    spec = synthetic_detector.spec(tmp)
    repository = render_repository(spec, tmp / "model_repository", target_for(spec, max_queue_delay_us=QUEUE_DELAY_US))
    with running_sidecar_env(tmp, repository) as sidecar_env:
        yield sidecar_env


@pytest.fixture(scope="module")
def files(env) -> Iterator[str]:
    """The bundles' folder over HTTP, served by a separate process."""
    port, log = free_port(), env.tmp / "http.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                    "--directory", str(env.tmp)], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def daemon(env, files, nats_server_module) -> Iterator[subprocess.Popen]:
    env.keys.trust_store(env.tmp / "trust")
    port, log = free_port(), env.tmp / "sidecar.log"
    command = [sys.executable, "-m", "sidecar", "--repository", str(env.repository), "--triton-http",
               env.server.http_url, "--state-dir", str(env.tmp / "state"), "--trust-dir", str(env.tmp / "trust"),
               "--port", str(port), "--probation-s", "1", "--watch-s", "0", "--target", "cpu",
               "--device-class", "x86-avx2", "--nats", nats_server_module.url, "--device-id", DEVICE,
               "--report-s", "0.5", "--accuracy-s", "1",
               "--triton-metrics", f"127.0.0.1:{env.server.metrics_port}"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_http(f"http://127.0.0.1:{port}/status", process, log)
    yield process
    assert _stop(process) == 0, log.read_text()[-3000:]


class Reports:
    """Every report of the device, read through the test's own durable consumer."""

    def __init__(self, bus: NatsFleetBus):
        self.bus, self.seen = bus, []

    async def wait_for(self, condition, what: str, deadline_s: float = 120.0) -> Report:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            for report in self.seen:
                if condition(report):
                    return report
            try:
                self.seen += [r for r in await self.bus.fetch_reports(timeout_s=0.5) if r.device_id == DEVICE]
            except Exception:  # noqa: BLE001 - NATS may be restarting; keep polling until the deadline
                await asyncio.sleep(0.2)
        pytest.fail(f"no report {what} within {deadline_s}s; last: {self.seen[-3:]}")


def test_device_registers_installs_reports_survives_an_outage_and_rolls_back(env, files, daemon, nats_server_module):
    bundle = env.bundles["same"]
    data = bundle.read_bytes()
    ref = BundleRef(f"{files}/{bundle.name}", hashlib.sha256(data).hexdigest(), len(data))

    async def main():
        bus = await NatsFleetBus.connect(nats_server_module.url, name="test", durable="test-device-reports")
        reports = Reports(bus)
        try:
            deadline = time.monotonic() + 60
            while DEVICE not in (registered := await bus.registrations()):
                assert time.monotonic() < deadline, "the device never registered"
                await asyncio.sleep(0.2)
            assert registered[DEVICE].device_classes == ("x86-avx2",) and registered[DEVICE].model_version is None

            await bus.put_desired(DEVICE, DesiredState("r1", "detect_detector", "1.2.0", "install", 1, ref))
            installed = await reports.wait_for(lambda r: r.install_state in ("installed", "failed") and
                                               r.generation == 1, "after the install")
            assert (installed.install_state, installed.model_version) == ("installed", "1.2.0"), installed.reason
            assert (await bus.registrations())[DEVICE].model_version == "1.2.0"

            for _ in range(20):
                assert "dog" in await asyncio.to_thread(detect_dog, env.server.grpc_url)
            measured = await reports.wait_for(lambda r: r.metrics.requests > 0 and r.metrics.p99_ms is not None,
                                              "with requests and latency")
            assert 0 < measured.metrics.p50_ms <= measured.metrics.p99_ms and measured.metrics.error_rate == 0.0
            checked = await reports.wait_for(lambda r: r.metrics.accuracy is not None, "with an accuracy check")
            assert checked.metrics.accuracy == 1.0

            with Load(env.server, ("grpc", "http")) as load:
                before = (await reports.wait_for(lambda r: r.seq > checked.seq, "before the outage")).seq
                nats_server_module.stop()
                await asyncio.sleep(3)  # the outage: the device keeps serving, its reports cannot go out
                await asyncio.to_thread(nats_server_module.start)
                after = await reports.wait_for(lambda r: r.seq > before + 2, "after the outage")
                await asyncio.to_thread(time.sleep, 1)
            assert load.failures == [] and load.ok > 0
            assert after.model_version == "1.2.0"

            await bus.put_desired(DEVICE, DesiredState("r1", "detect_detector", None, "rollback", 2,
                                                       reason="canary p99 +80%"))
            back = await reports.wait_for(lambda r: r.generation == 2 and r.install_state != "installing",
                                          "after the rollback")
            assert (back.install_state, back.model_version, back.reason) == ("rolled_back", None, "canary p99 +80%")
            print(f"installed: {installed}\nmeasured: {measured.metrics}\nreports seen: {len(reports.seen)}")
        finally:
            await bus.close()

    asyncio.run(main())
    versions = env.control.pinned_version()
    assert versions == 1 and "dog" in detect_dog(env.server.grpc_url)
