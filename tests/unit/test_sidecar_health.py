"""sidecar.health without a tritonserver: the stage thresholds, probation's window check, probation and the
gate against the in-memory Triton (tests.unit.sidecar_fakes) with stand-in pipeline steps. The gate with the
real pipeline steps and models: tests/integration/test_sidecar_swap.py and test_sidecar_golden.py."""
from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest

from sidecar.bundle_types import ExpectedOutput
from sidecar.errors import HealthGateError, TritonControlError
from sidecar.health import STAGES, StageThresholds, check_window, health_gate, probation, stage_thresholds
from sidecar.triton_control import VersionStats
from tests.unit.sidecar_fakes import FakeTriton

CANARY = STAGES["canary"]
CANDIDATE, PREVIOUS = 2, 1


def test_stage_thresholds():
    assert stage_thresholds("canary") is CANARY and stage_thresholds("ga").name == "ga"
    assert STAGES["ga"].probation_max_fail_ratio < CANARY.probation_max_fail_ratio, "GA is the stricter stage"
    custom = replace(CANARY, name="lenient", require_expected_outputs=False)
    assert stage_thresholds(custom) is custom
    with pytest.raises(ValueError, match="unknown rollout stage 'beta'; one of \\['canary', 'ga'\\]"):
        stage_thresholds("beta")


# --- probation's window ---------------------------------------------------------------------------------

def window(success: int, fail: int = 0, ms_per_inference: float = 1.0) -> VersionStats:
    return VersionStats(CANDIDATE, success + fail, success, fail, int(success * ms_per_inference * 1e6), success)


BASELINE = {"compute_infer_ns_per_inference": 1e6}


@pytest.mark.parametrize("delta, baseline, problem", [
    (window(100), BASELINE, None),
    (window(0), BASELINE, None),
    (window(95, 5), BASELINE, None),  # 5% is the canary's bound, not over it
    (window(94, 6), BASELINE, "6 of 100 inferences failed on v2 (more than 5%, stage canary)"),
    (window(10, ms_per_inference=2.0), BASELINE, None),  # 2x is the bound, not over it
    (window(10, ms_per_inference=2.5), BASELINE, "v2 computes 2.5 ms per inference, over 2.0x the previous "
                                                  "version's 1.0 ms (stage canary)"),
    (window(4, ms_per_inference=9.0), BASELINE, None),  # fewer than probation_min_inferences: no latency verdict
    (window(10, ms_per_inference=9.0), None, None),  # no baseline to compare with
    (window(10, ms_per_inference=9.0), {"compute_infer_ns_per_inference": None}, None),
])
def test_check_window(delta, baseline, problem):
    assert check_window(delta, baseline, CANARY) == problem


# --- probation ------------------------------------------------------------------------------------------

@pytest.fixture
def triton(tmp_path) -> FakeTriton:
    for version in (PREVIOUS, CANDIDATE):
        (tmp_path / "detect_detector" / str(version)).mkdir(parents=True)
    fake = FakeTriton(tmp_path)
    fake.load_detector([PREVIOUS, CANDIDATE])
    fake.pin_ensemble(CANDIDATE)
    return fake


def test_probation_watches_the_window_and_reports_it(triton):
    triton.traffic[CANDIDATE] = (3, 0, 3_000_000)
    report = probation(triton, CANDIDATE, BASELINE, CANARY, window_s=0.3, poll_s=0.01)
    polls = len(triton.calls_of("statistics")) - 1
    assert polls >= 2 and report["window_s"] == 0.3 and report["thresholds"]["name"] == "canary"
    assert report["inference_count"] == report["success"] == 3 * polls and report["fail"] == 0


def test_probation_fails_on_the_first_poll_over_the_bounds(triton):
    triton.traffic[CANDIDATE] = (1, 1, 1_000_000)
    with pytest.raises(HealthGateError, match=r"probation: 1 of 2 inferences failed on v2"):
        probation(triton, CANDIDATE, BASELINE, CANARY, window_s=60, poll_s=0.01)
    assert len(triton.calls_of("statistics")) == 2


def test_probation_needs_statistics_and_a_loaded_version(triton):
    triton.fail_next("statistics", TritonControlError("no statistics for detect_detector v2"))
    with pytest.raises(HealthGateError, match="probation: v2 has no statistics"):
        probation(triton, CANDIDATE, BASELINE, CANARY, window_s=0)
    with pytest.raises(HealthGateError, match="statistics of v2 unavailable") as raised:
        probation(triton, CANDIDATE, BASELINE, CANARY, window_s=0,
                  abort=lambda: triton.fail_next("statistics", TritonControlError("timed out")))
    assert isinstance(raised.value.__cause__, TritonControlError)
    with pytest.raises(TritonControlError, match="v2 is no longer ready"):  # Triton restarts between two polls
        probation(triton, CANDIDATE, BASELINE, CANARY, window_s=0, abort=triton.restart)


def test_probation_stops_when_asked(triton):
    with pytest.raises(HealthGateError, match="probation of v2 stopped: rollback requested: smoke"):
        probation(triton, CANDIDATE, BASELINE, CANARY, window_s=60, abort=lambda: "rollback requested: smoke")


# --- the gate -------------------------------------------------------------------------------------------

class StandInSteps:
    """The ensemble's steps around the detector, reduced to what the gate needs: an image is any bytes but
    b"broken", and the detector's raw output is already [1, K, 6] detections (x1 y1 x2 y2 score class)."""

    score_threshold = 0.25

    def preprocess(self, image: bytes):
        if image == b"broken":
            raise ValueError("cannot identify image file")
        return np.zeros((1, 3, 8, 8), np.float32), None

    def postprocess(self, raw: np.ndarray, transform):
        return raw[0, :, :4], raw[0, :, 4], raw[0, :, 5].astype(int)


DOG = [10.0, 10.0, 110.0, 110.0, 0.9, 16]
CAT = [200.0, 50.0, 260.0, 120.0, 0.8, 15]


def expected(name: str, *detections: list[float], image: bytes = b"photo") -> ExpectedOutput:
    return ExpectedOutput(base64.b64encode(image).decode(), [d[:4] for d in detections], [d[4] for d in detections],
                          [int(d[5]) for d in detections], name)


def gate(triton: FakeTriton, items, thresholds: StageThresholds = CANARY, since: VersionStats | None = None):
    return health_gate(triton, CANDIDATE, PREVIOUS, items, thresholds, steps=StandInSteps(), previous_since=since)


def test_a_candidate_that_reproduces_the_expected_outputs_passes(triton):
    triton.outputs[CANDIDATE] = np.array([[DOG, CAT]], np.float32)
    since = triton.statistics(PREVIOUS)
    report = gate(triton, [expected("a.jpg", DOG, CAT), expected("b.jpg", CAT, DOG)], since=since)
    assert report["expected_outputs_checked"] == 2 and report["warmup_requests"] == CANARY.warmup_requests
    assert report["latency_ms"]["verdict"] == "pass" and report["latency_ms"]["rounds"] >= CANARY.latency_min_rounds
    assert report["baseline"]["window"] == "install", "the latency rounds ran the previous version during the install"
    assert report["baseline"]["inference_count"] == report["latency_ms"]["rounds"] + 1  # + the uncounted warm-up round


def test_the_baseline_is_since_load_without_a_start_or_after_a_reload(triton):
    triton.outputs[CANDIDATE] = np.array([[DOG]], np.float32)
    assert gate(triton, [expected("a.jpg", DOG)])["baseline"]["window"] == "since load"
    since = VersionStats(PREVIOUS, 10_000, 10_000, 0, 10**10, 10_000)  # counters from before a reload
    assert gate(triton, [expected("a.jpg", DOG)], since=since)["baseline"]["window"] == "since load"


def test_every_mismatch_is_reported_by_image(triton):
    triton.outputs[CANDIDATE] = np.array([[DOG]], np.float32)
    items = [expected("a.jpg", DOG, CAT), expected("b.jpg", DOG), expected("c.jpg", [50.0, 50, 150, 150, 0.9, 16])]
    with pytest.raises(HealthGateError) as raised:
        gate(triton, items)
    message = str(raised.value)
    assert message.startswith("v2 does not reproduce 2 of 3 expected outputs")
    assert "expected output 0 (a.jpg) differs: expected class 15" in message
    assert "expected output 2 (c.jpg) differs" in message and "(b.jpg)" not in message
    assert not triton.calls_of("statistics"), "no latency rounds for a candidate with wrong outputs"


def test_an_output_that_does_not_postprocess_is_a_mismatch(triton):
    triton.outputs[CANDIDATE] = np.zeros((1, 3), np.float32)  # not [1, K, 6]
    with pytest.raises(HealthGateError, match=r"expected output 0 \(a.jpg\): v2 gave an output that does not "
                                              r"postprocess"):
        gate(triton, [expected("a.jpg", DOG)])


def test_unusable_samples_and_missing_expected_outputs_are_refused(triton):
    with pytest.raises(HealthGateError, match=r"1 expected-output image\(s\) do not preprocess: expected output 1 "
                                              r"\(b.jpg\): cannot identify"):
        gate(triton, [expected("a.jpg", DOG), expected("b.jpg", DOG, image=b"broken")])
    with pytest.raises(HealthGateError, match="carries no expected outputs"):
        gate(triton, [])
    assert not triton.calls_of("infer_detector"), "nothing runs before the samples are checked"


def test_without_expected_outputs_a_lenient_stage_warms_up_with_zeros(triton):
    report = gate(triton, [], replace(CANARY, name="lenient", require_expected_outputs=False))
    assert report["expected_outputs_checked"] == 0 and report["latency_ms"]["verdict"] == "pass"


def test_a_failing_warm_up_is_a_verdict_with_triton_s_error_as_cause(triton):
    triton.fail_next("infer_detector", TritonControlError("stub crashed"))
    with pytest.raises(HealthGateError, match="warm-up request 1 on v2 failed: stub crashed") as raised:
        gate(triton, [expected("a.jpg", DOG)])
    assert isinstance(raised.value.__cause__, TritonControlError), "sidecar.blocklist reads the cause"


def test_a_candidate_verified_slower_than_the_bound_is_refused(triton):
    triton.outputs[CANDIDATE] = np.array([[DOG]], np.float32)
    triton.infer_s[CANDIDATE] = 0.004
    with pytest.raises(HealthGateError, match="v2 is too slow"):
        gate(triton, [expected("a.jpg", DOG)], replace(CANARY, latency_slack_ms=0.0))
