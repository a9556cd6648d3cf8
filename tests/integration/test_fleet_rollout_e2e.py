"""A rollout end to end: three real sidecars, each beside its own tritonserver, a NATS server, an MLflow registry
server that serves the bundles, and the rollout controller as a process; every device under client load.

1. 1.1.0 (new weights, the same detections) goes canary -> early access -> general availability (34/67/100%,
   durations of seconds) on devices of one class: every device installs it over HTTP from the registry, at the
   stage its cohort says, and no client request fails on any device.
2. 1.2.0 is bad on one device class (its x86-avx2 bundle shifts every box: the device's own health gate refuses
   it): the canary's install failure triggers an automatic rollback of that stage, the reason is recorded, and
   every device is back on 1.1.0, again without a failed request.
The devices state their class (--device-class), as a fleet of mixed hardware would have it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from edgestack.server import TritonServer, free_port
from fleet.errors import TransportError
from fleet.mlflow_server import MlflowServer
from fleet.registry import Registry
from fleet.transport import NatsFleetBus
from sidecar.bundle import create_bundle
from sidecar.triton_control import TritonControl
from sidecar.trust import make_root, sign
from tests.fleet_support import assert_gone, nats_server_module  # noqa: F401 (fixture)
from tests.integration.conftest import assert_stopped, render
from tests.integration.sidecar_support import DETECTOR, DOG, EXPIRES, Keys, Load, expected_outputs, make_variant
from tests.loop_support import wait_for

pytestmark = pytest.mark.integration

DEVICES = (("dev-a", "x86-vnni"), ("dev-b", "x86-vnni"), ("dev-c", "x86-avx2"))
STRATEGY = """
stages:
  - {name: canary, percentage: 34, duration: 3s,
     rollback_trigger: {accuracy_drop: 3.0, latency_increase: 400, error_rate: 5.0, install_failures: 0}}
  - {name: early_access, percentage: 67, duration: 3s,
     rollback_trigger: {accuracy_drop: 1.0, latency_increase: 400, error_rate: 2.0, install_failures: 0}}
  - {name: general_availability, percentage: 100, duration: 0s,
     rollback_trigger: {accuracy_drop: 1.0, latency_increase: 400, error_rate: 2.0, install_failures: 0}}
analysis: {interval: 1s, failure_limit: 1, inconclusive: continue, min_reporting_devices: 1.0,
           max_device_staleness: 20s}
"""
ROLLOUT_DEADLINE_S = 420


@dataclass
class Device:
    device_id: str
    device_class: str
    folder: Path
    server: TritonServer
    api_port: int
    daemon: subprocess.Popen | None = None

    def versions(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/versions", timeout=10) as answer:
            return json.loads(answer.read())


@dataclass
class Fleet:
    tmp: Path
    devices: list[Device]
    nats_url: str
    registry: Registry
    registry_url: str
    keys: Keys
    bundles: dict[str, Path]
    controller: subprocess.Popen


def _edgestack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "edgestack.cli", *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"edgestack {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def _start_daemon(device: Device, nats_url: str, root_json: Path) -> subprocess.Popen:
    device.api_port = free_port()  # picked now, not minutes before the daemon binds it
    log = open(device.folder / "sidecar.log", "ab")  # noqa: SIM115 - closed with the process
    command = [sys.executable, "-m", "sidecar", "--repository", str(device.folder / "model_repository"),
               "--triton-http", device.server.http_url, "--state-dir", str(device.folder / "state"),
               "--trust-dir", str(device.folder / "trust"), "--root", str(root_json),
               "--port", str(device.api_port), "--probation-s", "2", "--watch-s", "0",
               "--device-class", device.device_class, "--nats", nats_url, "--device-id", device.device_id,
               "--report-s", "1", "--triton-metrics", f"127.0.0.1:{device.server.metrics_port}"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, (device.folder / "sidecar.log").read_text()[-3000:]
        try:
            device.versions()
            return process
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"sidecar of {device.device_id} did not answer:\n{(device.folder / 'sidecar.log').read_text()[-3000:]}")


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert_gone(process.pid)


def _registered(nats_url: str) -> set[str]:
    """Device ids registered on the bus; none while the controller has not created the buckets yet."""
    async def read() -> set[str]:
        bus = await NatsFleetBus.connect(nats_url, name="e2e-test", ensure=False)
        try:
            return set(await bus.registrations())
        except TransportError:
            return set()
        finally:
            await bus.close()

    return asyncio.run(read())


def _bundle(folder: Path, out: Path, keys: Keys, expected, version: str, metadata_version: int,
            classes: tuple[str, ...]) -> Path:
    from builder.device_class import ArtifactClasses

    return create_bundle(folder, out, model_name=DETECTOR, model_version=version, target="cpu",
                         metadata_version=metadata_version, keys=keys.bundle, expires=EXPIRES,
                         expected_outputs=expected, device_classes=ArtifactClasses(classes, classes))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, nats_server_module) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-e2e")
    keys = Keys()
    root_json = tmp / "root.json"
    root_json.write_text(json.dumps(sign(make_root(version=1, expires=EXPIRES, root_keys=keys.root, root_threshold=1,
                                                   bundle_keys=keys.bundle, bundle_threshold=1), keys.root)))
    devices: list[Device] = []
    servers: list[TritonServer] = []
    controller = None
    try:
        for device_id, device_class in DEVICES:
            folder = tmp / device_id
            folder.mkdir()
            repository = render(folder)
            server = TritonServer(repository, explicit_models=[], log_path=folder / "tritonserver.log")
            server.start()
            servers.append(server)
            control = TritonControl(server.http_url, repository)
            control.restore(1)
            control.close()
            devices.append(Device(device_id, device_class, folder, server, 0))
        first = devices[0]
        expected = expected_outputs(first.server, [DOG])
        source = first.folder / "model_repository" / DETECTOR / "1"
        variants = tmp / "variants"
        bundles = {
            "1.1.0": _bundle(make_variant(source, variants / "retrained", "retrained"), tmp / "1.1.0.bundle", keys,
                             expected, "1.1.0", 2, ("x86-vnni", "x86-avx2")),
            "1.2.0-good": _bundle(make_variant(source, variants / "retrained2", "retrained"), tmp / "1.2.0-good.bundle",
                                  keys, expected, "1.2.0", 3, ("x86-vnni",)),
            "1.2.0-bad": _bundle(make_variant(source, variants / "wrong", "wrong"), tmp / "1.2.0-bad.bundle", keys,
                                 expected, "1.2.0", 3, ("x86-avx2",)),
        }
        with MlflowServer(f"sqlite:///{tmp / 'registry.db'}", tmp / "artifacts", workdir=tmp,
                          log_path=tmp / "mlflow.log") as mlflow:
            registry = Registry(mlflow.url)
            controller_log = open(tmp / "controller.log", "ab")  # noqa: SIM115 - closed with the process
            controller = subprocess.Popen([sys.executable, "-m", "edgestack.cli", "fleet", "controller", "--nats",
                                           nats_server_module.url, "--registration-refresh", "1"],
                                          stdout=controller_log, stderr=subprocess.STDOUT, start_new_session=True)
            for device in devices:  # the controller creates the buckets and the stream; the devices use them
                device.daemon = _start_daemon(device, nats_server_module.url, root_json)
            # A device registering after a rollout started joins it mid-stage (a "devices_placed" event), which
            # would change the stages the tests check: start them with the whole fleet registered.
            wait_for(lambda: _registered(nats_server_module.url) >= {d.device_id for d in devices}, 120,
                     "every device to register on the bus", poll_s=0.5)
            (tmp / "strategy.yaml").write_text(STRATEGY)
            yield Fleet(tmp, devices, nats_server_module.url, registry, mlflow.url, keys, bundles, controller)
    finally:
        _stop(controller)
        for device in devices:
            _stop(device.daemon)
        for server in servers:
            pid = server.pid
            server.stop()
            assert_stopped(pid)


def _run_rollout(fleet: Fleet, version: str, rollout_id: str) -> dict:
    """Start a rollout through the CLI and wait, under client load on every device, until it ends."""
    _edgestack("rollout", "start", "--strategy", str(fleet.tmp / "strategy.yaml"), "--model", DETECTOR,
               "--version", version, "--registry", fleet.registry_url, "--nats", fleet.nats_url, "--id", rollout_id)
    loads = [Load(device.server, protocols=("grpc", "http")) for device in fleet.devices]
    for load in loads:
        load.__enter__()
    try:
        deadline = time.monotonic() + ROLLOUT_DEADLINE_S
        while time.monotonic() < deadline:
            assert fleet.controller.poll() is None, (fleet.tmp / "controller.log").read_text()[-4000:]
            record = json.loads(_edgestack("rollout", "status", rollout_id, "--json", "--nats", fleet.nats_url).stdout)
            if record["state"] in ("COMPLETED", "ROLLED_BACK", "ABORTED"):
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"rollout {rollout_id} did not end in {ROLLOUT_DEADLINE_S} s: "
                        f"{_edgestack('rollout', 'status', rollout_id, '--nats', fleet.nats_url).stdout}")
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    for device, load in zip(fleet.devices, loads):
        assert load.ok > 0, f"{device.device_id}: no request was answered"
        assert not load.failures, f"{device.device_id}: {len(load.failures)} failed requests: {load.failures[:3]}"
    return record


def _serving(device: Device) -> str | None:
    return device.versions().get("current_model_version")


@pytest.fixture(scope="module")
def good_rollout(fleet) -> dict:
    """1.1.0 rolled out to the whole fleet, once per module, whichever test asks first."""
    fleet.registry.push([fleet.bundles["1.1.0"]], changelog="retrained weights, same detections")
    return _run_rollout(fleet, "1.1.0", "e2e-good")


def test_a_good_release_goes_through_every_stage(fleet, good_rollout):
    record = good_rollout
    assert record["state"] == "COMPLETED", json.dumps(record["events"][-5:], indent=1)
    assert [_serving(d) for d in fleet.devices] == ["1.1.0"] * 3
    started = [e for e in record["events"] if e.get("event") == "stage_started"]
    assert [e["stage"] for e in started] == [0, 1, 2], started
    assert [e["reason"].split(": ")[1] for e in started] == [
        "2 devices added, 2 in the cohort", "1 devices added, 3 in the cohort", "0 devices added, 3 in the cohort"]
    deployed = [e["stage"] for e in record["events"] if e.get("event") == "stage_deployed"]
    assert deployed == [0, 1, 2], "each stage waits until its devices run 1.1.0"
    view = _edgestack("rollout", "status", "e2e-good", "--nats", fleet.nats_url).stdout
    assert "general_availability" in view


def test_a_release_bad_on_one_class_is_rolled_back_everywhere(fleet, good_rollout):
    assert good_rollout["state"] == "COMPLETED", "the fleet must be on 1.1.0 first"
    assert [_serving(d) for d in fleet.devices] == ["1.1.0"] * 3, [d.versions() for d in fleet.devices]
    fleet.registry.push([fleet.bundles["1.2.0-good"], fleet.bundles["1.2.0-bad"]],
                        changelog="1.2.0: the x86-avx2 build shifts every box")
    record = _run_rollout(fleet, "1.2.0", "e2e-bad-class")
    assert record["state"] == "ROLLED_BACK", json.dumps(record["events"][-5:], indent=1)
    revert = record["revert"]
    assert revert and revert.get("reverted_at"), revert
    assert "install_failures on class x86-avx2" in revert["reason"] and "dev-c" in revert["reason"], revert["reason"]
    assert [_serving(d) for d in fleet.devices] == ["1.1.0"] * 3
    avx2 = next(d for d in fleet.devices if d.device_class == "x86-avx2")
    history = json.loads(_edgestack("sidecar", "history", "--api", f"http://127.0.0.1:{avx2.api_port}").stdout)
    assert any(h.get("event") == "rolled_back" or h.get("event") == "install_failed" for h in history), history[-5:]
