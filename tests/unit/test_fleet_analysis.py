"""fleet.analysis: device classification (updated, failed, lying, stale, silent ...), aggregates, each trigger
overall and per class against both baselines, install failures, inconclusive rounds, and the size of a round
over 10,000 devices."""
from __future__ import annotations

import time

import pytest

from fleet.analysis import (ALL, Aggregate, LatestReports, aggregate, analyse, classify, fresh_reports, merge)
from fleet.protocol import InvalidReport, Metrics, Report
from fleet.strategy import Stage, Trigger

NOW = 1_900_000_000.0
GEN = 5
STAGE = Stage(name="canary", percentage=10, duration_s=60,
              trigger=Trigger(accuracy_drop=2.0, latency_increase=30, error_rate=5.0, install_failures=10))
BASE = Metrics(requests=100, p50_ms=20, p99_ms=50, error_rate=1.0, accuracy=0.9)


def report(device_id, *, state="installed", version="2.0.0", generation=GEN, metrics=BASE) -> Report:
    return Report(device_id=device_id, seq=1, model_version=version, install_state=state, generation=generation,
                  metrics=metrics)


def judge(latest, cohort, *, before=None, control=None, min_reporting=0.8, stage=STAGE):
    if before is None:
        before = aggregate(fresh_reports({d: c for d, (c, _) in cohort.items()}, _baseline(cohort), NOW, 60))
    return analyse(stage=stage, stage_index=0, cohort=cohort, control=control or {}, before=before, latest=latest,
                   version="2.0.0", now=NOW, staleness_s=60, min_reporting=min_reporting)


def _baseline(cohort) -> LatestReports:
    latest = LatestReports()
    latest.ingest([report(d, version="1.0.0", generation=0, state="idle") for d in cohort], NOW)
    return latest


def fleet(n_per_class=10, classes=("a", "b")):
    return {f"{c}{i}": (c, GEN) for c in classes for i in range(n_per_class)}


def test_each_device_is_classified_once():
    latest = LatestReports()
    latest.ingest([report("updated"), report("installing", state="installing"), report("failed", state="failed"),
                   report("refused", state="ineligible"), report("rolled", state="rolled_back"),
                   report("pending", generation=GEN - 1), report("claims", version="9.9.9"),
                   InvalidReport(device_id="garbage", error="metrics.p99_ms = -3 is outside [0, 600000]")], NOW)
    latest.ingest([report("stale")], NOW - 61)
    got = {d: classify(d, GEN, "2.0.0", latest, NOW, 60)[0] for d in
           ("updated", "installing", "failed", "refused", "rolled", "pending", "claims", "garbage", "stale", "none")}
    assert got == {"updated": "updated", "installing": "installing", "failed": "failed", "refused": "failed",
                   "rolled": "rolled_back", "pending": "pending", "claims": "lying", "garbage": "lying",
                   "stale": "stale", "none": "silent"}


def test_aggregates_are_medians_and_request_weighted_error_rates_and_merge_by_count():
    reports = [("a", report("1", metrics=Metrics(requests=100, p50_ms=10, p99_ms=30, error_rate=10.0,
                                                  accuracy=0.5))),
               ("a", report("2", metrics=Metrics(requests=300, p50_ms=20, p99_ms=40, error_rate=0.0, accuracy=0.9))),
               ("b", report("3", metrics=Metrics(requests=0, p50_ms=None, p99_ms=None, error_rate=None,
                                                  accuracy=None)))]
    aggs = aggregate(reports)
    assert aggs[ALL].devices == 3 and aggs[ALL].requests == 400
    assert aggs["a"].get("p99_ms") == 35 and aggs["a"].get("error_rate") == 2.5 and aggs["b"].get("p99_ms") is None
    assert Aggregate.from_dict(aggs["a"].to_dict()) == aggs["a"]
    merged = merge([Aggregate(devices=1, values={"p99_ms": 10}, counts={"p99_ms": 1}),
                    Aggregate(devices=3, values={"p99_ms": 30}, counts={"p99_ms": 3})])
    assert merged.get("p99_ms") == 25 and merged.devices == 4


def test_a_healthy_stage_passes():
    cohort = fleet()
    latest = LatestReports()
    latest.ingest([report(d) for d in cohort], NOW)
    verdict = judge(latest, cohort)
    assert verdict.verdict == "pass" and verdict.counts["updated"] == 20 and verdict.failures == []


@pytest.mark.parametrize("bad,trigger", [
    (Metrics(requests=100, p50_ms=20, p99_ms=50, error_rate=1.0, accuracy=0.85), "accuracy_drop"),
    (Metrics(requests=100, p50_ms=20, p99_ms=70, error_rate=1.0, accuracy=0.9), "latency_increase"),
    (Metrics(requests=100, p50_ms=20, p99_ms=50, error_rate=8.0, accuracy=0.9), "error_rate"),
])
def test_a_model_bad_on_one_class_trips_that_class_while_all_devices_look_fine(bad, trigger):
    cohort = fleet(n_per_class=10, classes=("a", "b", "c"))
    latest = LatestReports()
    latest.ingest([report(d, metrics=bad if cls == "c" else BASE) for d, (cls, _) in cohort.items()], NOW)
    verdict = judge(latest, cohort)
    assert verdict.verdict == "fail"
    assert [(f["trigger"], f["scope"]) for f in verdict.failures] == [(trigger, "c")]
    assert "class c" in verdict.reason


def test_a_trigger_needs_both_baselines_when_the_control_has_enough_devices():
    """Latency up 40% against the cohort's own past, but the devices not yet updated are as slow right now (load
    on the whole fleet): no rollback. With the control as fast as before, it trips."""
    cohort = fleet(n_per_class=10, classes=("a",))
    slow = Metrics(requests=100, p50_ms=20, p99_ms=70, error_rate=1.0, accuracy=0.9)
    control = {f"ctl{i}": "a" for i in range(5)}
    latest = LatestReports()
    latest.ingest([report(d, metrics=slow) for d in cohort], NOW)
    latest.ingest([report(d, version="1.0.0", generation=0, state="idle", metrics=slow) for d in control], NOW)
    assert judge(latest, cohort, control=control).verdict == "pass"
    latest.ingest([report(d, version="1.0.0", generation=0, state="idle") for d in control], NOW)
    failed = judge(latest, cohort, control=control)
    assert failed.verdict == "fail" and failed.failures[0]["control"] == 50 and failed.failures[0]["before"] == 50


def test_install_failures_count_per_class_and_trip_even_without_a_quorum():
    cohort = fleet(n_per_class=10, classes=("a", "b"))
    latest = LatestReports()
    latest.ingest([report("b0", state="failed"), report("b1", state="rolled_back"), report("a0")], NOW)
    verdict = judge(latest, cohort)
    assert verdict.verdict == "fail"
    assert [(f["scope"], f["devices"], f["of"]) for f in verdict.failures] == [("b", 2, 10)]  # 20% > 10; all: 10%


def test_too_few_reporting_devices_is_inconclusive_and_counts_who_is_missing():
    cohort = fleet(n_per_class=10, classes=("a",))
    latest = LatestReports()
    latest.ingest([report(f"a{i}") for i in range(6)] + [InvalidReport("a6", "bad")], NOW)
    latest.ingest([report("a7")], NOW - 600)
    verdict = judge(latest, cohort)
    assert verdict.verdict == "inconclusive"
    assert {k: verdict.counts[k] for k in ("updated", "lying", "stale", "silent", "targeted")} == {
        "updated": 6, "lying": 1, "stale": 1, "silent": 2, "targeted": 10}
    assert "6 of 10 devices" in verdict.reason


def test_a_verdict_round_trips_through_json():
    cohort = fleet()
    latest = LatestReports()
    latest.ingest([report(d) for d in cohort], NOW)
    verdict = judge(latest, cohort)
    assert type(verdict).from_dict(verdict.to_dict()).to_dict() == verdict.to_dict()


def test_one_round_over_ten_thousand_devices_stays_small(capsys):
    """Not a timing assertion: prints the CPU time of one round (fleet.analysis must stay well under 1 s)."""
    classes = ("x86-avx2", "x86-vnni", "x86-avx512", "arm64-neon", "arm64-sve")
    cohort = {f"d{i:05d}": (classes[i % 5], GEN) for i in range(10_000)}
    latest = LatestReports()
    latest.ingest([report(d, metrics=Metrics(requests=50, p50_ms=10 + i % 7, p99_ms=30 + i % 11, error_rate=0.1,
                                             accuracy=0.9)) for i, d in enumerate(cohort)], NOW)
    before = aggregate(fresh_reports({d: c for d, (c, _) in cohort.items()}, latest, NOW, 60))
    started = time.process_time()
    verdict = judge(latest, cohort, before=before)
    cpu = time.process_time() - started
    assert verdict.verdict == "pass" and verdict.counts["updated"] == 10_000 and len(verdict.metrics) == 6
    with capsys.disabled():
        print(f"\nanalysis of 10,000 devices: {cpu * 1000:.1f} ms CPU")
