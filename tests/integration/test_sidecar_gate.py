"""The health gate's latency check under load, against a real tritonserver: a byte-identical model is installed
again and again while client threads keep the ensemble busy, and the gate must never refuse it (it did, when
one median of three requests per version decided). The slow and wrong models are refused and blocked in
test_sidecar_swap.py; Triton or the agent dying mid-install is transient there and in test_sidecar_crash.py."""
from __future__ import annotations

import time

import pytest

from tests.integration.sidecar_support import Load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swap_env(fixture_sidecar_env):
    """The sidecar server with the fixture detector (sidecar_support), serving v1."""
    fixture_sidecar_env.reset_to_v1()
    return fixture_sidecar_env

INSTALLS = 10


def test_a_byte_identical_model_installed_under_load_is_never_refused(swap_env, make_agent):
    agent = make_agent(keep_versions=2, probation_s=0.5)
    control = swap_env.control
    with Load(swap_env.server, ("grpc", "http")) as load:  # two cores busy; the gate's requests queue behind theirs
        deadline = time.monotonic() + 60
        while load.ok < 4:  # the clients are answered before the first install starts
            assert time.monotonic() < deadline and not load.failures, load.failures[:3]
            time.sleep(0.1)
        for n in range(INSTALLS):
            status = agent.install(swap_env.bundles["same"])  # a refusal raises here and fails the test
            assert status["state"] == "DONE" and status["current"] == n + 2, status
    assert load.failures == [], load.failures[:5]
    assert control.pinned_version() == INSTALLS + 1 and control.ready_versions() == [INSTALLS + 1]
    assert agent.blocked() == [] and agent.status()["bad_bundles"] == 0
    gates = [e["latency_ms"] for e in agent.history() if e["event"] == "gate_passed"]
    assert len(gates) == INSTALLS and all(g["verdict"] == "pass" for g in gates), gates
    print(f"\n{INSTALLS} identical installs under load, {load.ok} requests served; gate latency rounds, "
          f"median candidate/previous ratio and share of the bound: "
          f"{[(g['rounds'], g['ratio'], g['share_of_bound']) for g in gates]}")
