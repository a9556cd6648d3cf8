"""The sidecar's update agent against a real tritonserver in explicit model-control mode, with real files.

The server is the session's shared sidecar server (tests/integration/sidecar_support.py: explicit mode, restored
to v1); each test starts from v1 only, with a fresh trust store and agent state. Its bundles are signed with fresh
keys from copies of the rendered detector folder: the same model (a good v2), an ONNX graph with its boxes shifted
(wrong outputs), a model.py that sleeps (too slow) and one that raises in initialize (crashes on load).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.agent import Agent
from sidecar.bundle import create_bundle
from sidecar.bundle_types import ExpectedOutput
from sidecar.errors import BundleError, DiskSpaceError, HealthGateError, TritonControlError
from sidecar.state import StateStore
from sidecar.trust import TrustStore
from tests.integration.sidecar_support import (DETECTOR, DOG, EXPIRES, Load, detect_dog, expected_outputs,
                                               leftovers, make_bundle, make_variant)
from tests.loop_support import wait_for

pytestmark = pytest.mark.integration


def test_good_swap_under_load_fails_no_request(swap_env, make_agent, record_property):
    agent = make_agent(probation_s=3.0)
    control = swap_env.control
    with Load(swap_env.server) as load:
        deadline = time.monotonic() + 60
        while load.ok < 4:  # every client is answered before the install starts
            assert time.monotonic() < deadline and not load.failures, load.failures[:3]
            time.sleep(0.05)
        before = load.ok
        started = time.monotonic()
        status = agent.install(swap_env.bundles["same"])
        install_s = time.monotonic() - started
        during = load.ok - before
        v2_start = control.statistics(2).success_count
        deadline = time.monotonic() + 60
        while control.statistics(2).success_count <= v2_start:  # the load goes on until v2 answers it after the install
            assert time.monotonic() < deadline and not load.failures, load.failures[:3]
            time.sleep(0.05)
    assert load.failures == [], load.failures[:5]
    assert status["state"] == "DONE" and status["current"] == 2 and status["committed"] == [1, 2]
    assert control.pinned_version() == 2 and control.ready_versions() == [2]
    assert control.statistics(2).success_count > v2_start, "traffic did not move to v2"
    assert (swap_env.repository / DETECTOR / "1").is_dir(), "v1 is kept for rollback"
    assert leftovers(swap_env.repository) == []
    committed = next(e for e in agent.history() if e["event"] == "committed")
    gate = next(e for e in agent.history() if e["event"] == "gate_passed")
    watched = next(e for e in agent.history() if e["event"] == "probation_passed")
    baseline = StateStore(agent.store.path).load().baseline
    ms = lambda ns: None if ns is None else round(ns / 1e6, 1)  # noqa: E731
    numbers = {"requests_ok": load.ok, "requests_failed": len(load.failures), "requests_during_install": during,
               "install_s": round(install_s, 2), "swap_s": committed["swap_s"], "pin_s": committed["pin_s"],
               "max_request_s": round(max(load.latencies), 2), "gate_latency_ms": gate["latency_ms"],
               "probation_inferences": watched["inference_count"], "probation_fail": watched["fail"],
               "probation_compute_ms": ms(watched["compute_infer_ns_per_inference"]),
               "baseline_compute_ms": ms(baseline["compute_infer_ns_per_inference"]), "baseline": baseline["window"]}
    print(f"\nsidecar swap under load: {numbers}")
    for key, value in numbers.items():
        record_property(key, value)
    assert during > 0 and load.ok > during and watched["inference_count"] > 0, "probation saw no traffic"


# --- failures roll back ----------------------------------------------------------------------------------

def _assert_rolled_back(swap_env, agent: Agent, reason_part: str) -> None:
    status = agent.status()
    assert status["state"] == "FAILED" and status["current"] == 1 and status["committed"] == [1]
    assert reason_part in status["reason"], status["reason"]
    assert swap_env.control.pinned_version() == 1 and swap_env.control.ready_versions() == [1]
    assert agent.disk_versions() == [1] and leftovers(swap_env.repository) == []
    assert "dog" in detect_dog(swap_env.server.http_url, "http")
    rolled = [e for e in agent.history() if e["event"] == "rolled_back"]
    assert rolled and rolled[-1]["bad"] and rolled[-1]["bad_version"] == 2 and reason_part in rolled[-1]["reason"]
    assert rolled[-1]["kind"] == status["failure_kind"] == "verified_bad", "verified bad: the bundle is blocked"
    assert [(b["sha256"], reason_part in b["reason"]) for b in agent.blocked()] == [(rolled[-1]["bundle_sha256"], True)]
    assert TrustStore(agent.trust.folder).trusted_version(DETECTOR) is None, "a failed version raised the floor"


def test_wrong_outputs_are_rolled_back(swap_env, make_agent):
    agent = make_agent()
    with pytest.raises(HealthGateError, match="expected output 0 differs"):
        agent.install(swap_env.bundles["wrong"])
    _assert_rolled_back(swap_env, agent, "IoU")
    with pytest.raises(Exception, match="rolled back before"):  # the bad bundle is remembered
        agent.install(swap_env.bundles["wrong"])
    assert swap_env.control.pinned_version() == 1 and agent.disk_versions() == [1]
    [blocked] = agent.blocked()
    assert agent.unblock(blocked["sha256"][:12], "retrained upstream, check again")["sha256"] == blocked["sha256"]
    assert agent.blocked() == [] and agent.history()[-1]["reason"] == "retrained upstream, check again"
    with pytest.raises(HealthGateError, match="expected output 0 differs"):  # verified and gated again, not refused
        agent.install(swap_env.bundles["wrong"])
    assert [b["sha256"] for b in agent.blocked()] == [blocked["sha256"]]


def test_too_slow_is_rolled_back(swap_env, make_agent):
    agent = make_agent()
    with pytest.raises(HealthGateError, match="too slow"):
        agent.install(swap_env.bundles["slow"])
    _assert_rolled_back(swap_env, agent, "too slow")


def test_crash_on_load_is_rolled_back(swap_env, make_agent):
    agent = make_agent()
    with pytest.raises(TritonControlError, match="crashes on load"):
        agent.install(swap_env.bundles["crash"])
    _assert_rolled_back(swap_env, agent, "crashes on load")


def test_disk_full_refuses_before_staging(swap_env, make_agent):
    free = shutil.disk_usage(swap_env.repository).free
    agent = make_agent(min_free_bytes=free + (1 << 40))
    with pytest.raises(DiskSpaceError, match="must stay free"):
        agent.install(swap_env.bundles["same"])
    status = agent.status()
    assert status["state"] == "FAILED" and status["current"] == 1 and "DiskSpaceError" in status["reason"]
    assert agent.disk_versions() == [1] and leftovers(swap_env.repository) == []
    assert not agent.staging.exists(), "nothing may be extracted when the disk is full"
    assert swap_env.control.pinned_version() == 1 and swap_env.control.ready_versions() == [1]


# --- delta bundles ------------------------------------------------------------------------------------------

def test_delta_bundle_installs_on_top_of_the_committed_version(swap_env, make_agent):
    v1 = swap_env.repository / DETECTOR / "1"
    retrained = make_variant(v1, swap_env.tmp / "variants" / "retrained", "retrained")
    expected = expected_outputs(swap_env.server, [DOG])
    delta = create_bundle(retrained, swap_env.tmp / "retrained-delta.bundle", model_name=DETECTOR,
                          model_version="1.5.0", target="cpu", metadata_version=20, keys=swap_env.keys.bundle,
                          expires=EXPIRES, expected_outputs=expected, base_dir=v1, base_model_version="1.0.0")
    full = make_bundle(retrained, swap_env.tmp / "retrained-full.bundle", swap_env.keys, expected, 20)
    assert delta.stat().st_size < full.stat().st_size / 10, (delta.stat().st_size, full.stat().st_size)

    agent = make_agent()
    status = agent.install(delta)
    assert status["state"] == "DONE" and status["current"] == 2 and status["committed"] == [1, 2]
    installed = swap_env.repository / DETECTOR / "2"
    assert (installed / "model.onnx").read_bytes() == (retrained / "model.onnx").read_bytes()
    assert (v1 / "model.onnx").read_bytes() != (retrained / "model.onnx").read_bytes(), "v1 left untouched"
    verified = next(e for e in agent.history() if e["event"] == "verified")
    assert verified["base_version"] == "1.0.0" and verified["delivery"]["model.onnx"] in ("bsdiff4", "zstd-patch-from",
                                                                                         "onnx-tensor")
    assert verified["delivery"]["model.py"] == "unchanged"
    assert swap_env.control.pinned_version() == 2 and "dog" in detect_dog(swap_env.server.grpc_url)


def test_delta_bundle_without_its_base_on_the_device_is_refused(swap_env, make_agent):
    v1 = swap_env.repository / DETECTOR / "1"
    other_base = make_variant(v1, swap_env.tmp / "variants" / "other-base", "retrained")
    delta = create_bundle(v1, swap_env.tmp / "against-other.bundle", model_name=DETECTOR, model_version="1.6.0",
                          target="cpu", metadata_version=21, keys=swap_env.keys.bundle, expires=EXPIRES,
                          base_dir=other_base, base_model_version="1.5.0")
    agent = make_agent()
    with pytest.raises(BundleError, match="delta against base 1.5.0 .* install the full bundle"):
        agent.install(delta)
    status = agent.status()
    assert status["state"] == "FAILED" and status["current"] == 1 and "install the full bundle" in status["reason"]
    assert agent.disk_versions() == [1] and leftovers(swap_env.repository) == [] and not agent.staging.exists()
    assert swap_env.control.pinned_version() == 1 and swap_env.control.ready_versions() == [1]


# --- Triton restarts ---------------------------------------------------------------------------------------

def test_triton_restart_restores_exactly_the_committed_version(swap_env, make_agent):
    agent = make_agent()
    assert agent.install(swap_env.bundles["same"])["current"] == 2
    server, control = swap_env.server, swap_env.control
    control.close()
    agent.control.close()
    server.stop()
    server.start()  # explicit mode, no models: nothing is served until the agent restores
    assert control.pinned_version() is None and control.ready_versions() == []
    status = agent.recover()
    assert status["state"] == "DONE" and status["current"] == 2
    assert control.pinned_version() == 2 and control.ready_versions() == [2]
    assert "dog" in detect_dog(server.grpc_url)
    # Triton counts a request when it is released, which can be just after the client has its response.
    wait_for(lambda: control.statistics(2).success_count >= 1, 10.0, "v2 to count the request")
    assert StateStore(agent.store.path).load().committed == [1, 2]


@pytest.mark.parametrize("kill_in", ["LOADING", "HEALTH_GATE"])
def test_triton_killed_mid_swap_recovers_to_the_committed_version(swap_env, make_agent, kill_in):
    """tritonserver is SIGKILLed (with its Python stubs) while the agent loads or gates v2. The install fails
    without Triton to roll back on; once Triton is back (empty, explicit mode), recover() finishes the
    rollback: v1 served and pinned, v2's folder gone, v2 never trusted."""
    agent = make_agent()
    server, control = swap_env.server, swap_env.control
    outcome: dict[str, BaseException | dict] = {}

    def install() -> None:
        try:
            outcome["status"] = agent.install(swap_env.bundles["same"])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome["error"] = exc

    thread = threading.Thread(target=install, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while (state := StateStore(agent.store.path).load()) is None or state.state.value != kill_in:
        assert thread.is_alive() and time.monotonic() < deadline, f"the install never reached {kill_in}: {outcome}"
        time.sleep(0.005)
    os.killpg(server.pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" in outcome, f"the install went on without Triton: {outcome}"
    assert StateStore(agent.store.path).load().state.value == "ROLLING_BACK", "persisted before the rollback failed"

    control.close()
    agent.control.close()
    server.stop()
    server.start()  # explicit mode, nothing loaded: the device serves nothing until the agent recovers
    status = agent.recover()
    assert status["state"] == "FAILED" and status["current"] == 1 and status["committed"] == [1], status
    assert control.pinned_version() == 1 and control.ready_versions() == [1]
    assert agent.disk_versions() == [1] and leftovers(swap_env.repository) == []
    assert TrustStore(agent.trust.folder).trusted_version(DETECTOR) is None
    assert [e for e in agent.history() if e["event"] == "recover"][-1]["found"] == "ROLLING_BACK"
    assert status["failure_kind"] == "transient" and agent.blocked() == [], "Triton's death is not the bundle's fault"
    assert "dog" in detect_dog(server.grpc_url)


def test_compare_detections_tolerances():
    from sidecar.health import compare_detections

    expected = ExpectedOutput("", [[10, 10, 110, 110], [200, 200, 240, 240]], [0.9, 0.37], [16, 2])
    check = dict(iou_min=0.9, score_tolerance=0.05, score_threshold=0.35)
    assert compare_detections(expected, [[11, 10, 111, 110]], [0.88], [16], **check) is None  # borderline may go
    assert "IoU" in compare_detections(expected, [[40, 40, 140, 140]], [0.9], [16], **check)
    assert "score" in compare_detections(expected, [[10, 10, 110, 110]], [0.8], [16], **check)
    assert "IoU" in compare_detections(expected, [[10, 10, 110, 110]], [0.9], [17], **check)  # class differs
    assert "unexpected" in compare_detections(expected, [[10, 10, 110, 110], [300, 0, 400, 90]], [0.9, 0.7],
                                              [16, 0], **check)


# --- device classes ---------------------------------------------------------------------------------------

def _class_bundle(swap_env, name: str, n: int, *, target: str = "cpu", classes=None, expected=()) -> Path:
    return create_bundle(swap_env.repository / DETECTOR / "1", swap_env.tmp / f"{name}.bundle", model_name=DETECTOR,
                         model_version=f"1.{n}.0", target=target, metadata_version=n, keys=swap_env.keys.bundle,
                         expires=EXPIRES, expected_outputs=expected, device_classes=classes)


def _assert_refused_before_staging(swap_env, agent: Agent, message: str) -> None:
    status = agent.status()
    assert status["state"] == "FAILED" and status["current"] == 1 and message in status["reason"]
    assert agent.disk_versions() == [1] and leftovers(swap_env.repository) == []
    assert not agent.staging.exists(), "nothing may be extracted for a bundle of another class"
    assert swap_env.control.pinned_version() == 1 and swap_env.control.ready_versions() == [1]
    assert [e["event"] for e in agent.history()].count("install_failed") == 1
    assert StateStore(agent.state_dir / "state.json").load().bad_bundles == {}, "a misdirected bundle is not bad"


@pytest.mark.parametrize("case", ["other-target", "other-class"])
def test_bundle_for_another_device_class_is_refused_before_staging(swap_env, make_agent, case):
    from builder.device_class import ArtifactClasses

    agent = make_agent(device_classes=("x86-vnni",))
    if case == "other-target":  # the reported fault: a GPU bundle committed and served on a CPU device
        bundle, message = _class_bundle(swap_env, "gpu-target", 60, target="nvidia-gpu"), "target nvidia-gpu"
    else:  # e.g. full-range U8S8 INT8: exact on VNNI only, built for an AVX2 fleet by mistake
        bundle = _class_bundle(swap_env, "avx2-only", 61, classes=ArtifactClasses(("x86-avx2",), ("x86-avx2",)))
        message = "built for device class(es) x86-avx2; this device is x86-vnni"
    with pytest.raises(BundleError, match=re.escape(message)):
        agent.install(bundle)
    _assert_refused_before_staging(swap_env, agent, message)
    assert "dog" in detect_dog(swap_env.server.grpc_url)


def test_unverified_class_must_pass_the_gate_with_expected_outputs(swap_env, make_agent):
    """A stage that lets a bundle without expected outputs through still refuses one whose model was never
    verified on this device's class: only its gate can check it here."""
    from builder.device_class import ArtifactClasses
    from sidecar.health import STAGES

    lenient = replace(STAGES["canary"], name="lenient", require_expected_outputs=False)
    unverified = _class_bundle(swap_env, "unverified", 62, classes=ArtifactClasses(("x86-avx2", "x86-vnni"), ("x86-avx2",)))
    agent = make_agent(device_classes=("x86-vnni",), stage=lenient)
    with pytest.raises(HealthGateError, match="no expected outputs"):
        agent.install(unverified)
    assert agent.status()["current"] == 1 and agent.disk_versions() == [1]
    assert any(e["event"] == "unverified_class" for e in agent.history())

    verified = _class_bundle(swap_env, "verified", 63, classes=ArtifactClasses(("x86-avx2", "x86-vnni"), ("x86-vnni",)))
    assert agent.install(verified)["current"] == 2
