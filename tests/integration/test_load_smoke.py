"""Smoke load against a real tritonserver: locust (headless, its own process) with tritonclient users.

Bounded for a 2-core machine: 4 users for 6 s per protocol. One run per protocol; the SLO verdicts
(an impossible one and a generous one) are checked on those runs rather than on extra loads.
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from edgestack.load import LoadReport, run_load

pytestmark = pytest.mark.integration

USERS = 4
DURATION_S = 6
GENEROUS_SLO_MS = 60000.0
IMPOSSIBLE_SLO_MS = 0.001


def _assert_sane(report: LoadReport, protocol: str) -> None:
    print(report.table())  # shown with -s / -rP: the smoke run's numbers
    assert report.requests > 0, report.table()
    assert report.failures == 0, report.table()
    assert report.user_errors == 0, report.table()
    assert report.failure_messages == ()
    assert report.throughput_rps > 0
    for value in (report.p50_ms, report.p95_ms, report.p99_ms):
        assert not math.isnan(value) and value > 0, report.table()
    assert report.p50_ms <= report.p95_ms <= report.p99_ms, report.table()
    assert set(report.per_protocol) == {protocol}
    assert report.per_protocol[protocol]["requests"] == report.requests
    # Every successful result was counted by SOURCE; no cloud is configured, so all stay on the edge.
    counts = report.results[protocol]
    assert counts["ok"] == report.requests
    assert (counts["edge"], counts["cloud"], counts["degraded"]) == (report.requests, 0, 0)


def _no_locust_left() -> None:
    found = subprocess.run(["pgrep", "-f", "loadtests/locustfile.py"], capture_output=True, text=True)
    assert found.stdout.strip() == "", f"locust processes left behind: {found.stdout}"


def test_grpc_smoke_load_holds_a_generous_slo(edge_server, fixture_images, tmp_path):
    out = tmp_path / "grpc.json"
    report = run_load(None, edge_server.grpc_url, users=USERS, spawn_rate=USERS, duration_s=DURATION_S,
                      protocol="grpc", images=fixture_images, slo_p99_ms=GENEROUS_SLO_MS, out_json=out)
    _assert_sane(report, "grpc")
    assert report.slo_held is True and report.passed
    assert not report.slo_met(IMPOSSIBLE_SLO_MS)
    saved = json.loads(out.read_text())
    assert (saved["requests"], saved["slo_held"], saved["passed"]) == (report.requests, True, True)
    _no_locust_left()


def test_http_smoke_load_misses_an_impossible_slo(edge_server, fixture_images):
    report = run_load(edge_server.http_url, None, users=USERS, spawn_rate=USERS, duration_s=DURATION_S,
                      protocol="http", images=fixture_images, slo_p99_ms=IMPOSSIBLE_SLO_MS, out_json=None)
    _assert_sane(report, "http")
    assert report.slo_held is False and not report.passed
    assert report.slo_met(GENEROUS_SLO_MS)
    _no_locust_left()
