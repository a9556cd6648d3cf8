"""The health gate's latency statistics (sidecar.latency) on simulated rounds: a fake clock that each fake request
advances by a latency drawn from a seeded random generator, so nothing here depends on this machine's speed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sidecar.errors import GateInconclusiveError, HealthGateError, TritonControlError
from sidecar.health import STAGES
from sidecar.latency import INCONCLUSIVE, PASS, SLOW, check_latency, judge_latency, measure_latency, median_interval

CANARY = STAGES["canary"]
CANDIDATE, PREVIOUS = 2, 1


class FakeDevice:
    """infer(version) advances the clock by that version's next latency; a load spike slows both versions."""

    def __init__(self, seed: int, previous_s: float, slowdown: float, sigma: float, spikes: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.base = {PREVIOUS: previous_s, CANDIDATE: previous_s * slowdown}
        self.sigma, self.spikes, self.now, self.calls = sigma, spikes, 0.0, []

    def clock(self) -> float:
        return self.now

    def infer(self, version: int) -> None:
        self.calls.append(version)
        spike = 3.0 if self.rng.random() < self.spikes else 1.0
        self.now += self.base[version] * math.exp(self.rng.normal(0.0, self.sigma)) * spike

    def infer_detector(self, version: int, _probe) -> None:
        self.infer(version)


def gate(device: FakeDevice, **overrides):
    options = dict(factor=CANARY.latency_factor, slack_ms=CANARY.latency_slack_ms, alpha=CANARY.latency_alpha,
                   pass_alpha=CANARY.latency_pass_alpha, min_rounds=CANARY.latency_min_rounds,
                   max_rounds=CANARY.latency_max_rounds, clock=device.clock)
    return measure_latency(device.infer, CANDIDATE, PREVIOUS, **{**options, **overrides})


def verdicts(slowdown: float, sigma: float, spikes: float = 0.0, gates: int = 300) -> dict[str, int]:
    counts = {PASS: 0, SLOW: 0, INCONCLUSIVE: 0}
    for seed in range(gates):
        counts[gate(FakeDevice(seed, 0.25, slowdown, sigma, spikes)).verdict] += 1
    return counts


def test_median_interval_is_the_sign_tests_order_statistics():
    assert median_interval(range(1, 10), 0.001) == (-math.inf, math.inf)  # 2**-9 > 0.001: no bound yet
    assert median_interval(range(1, 11), 0.001) == (1, 10)  # 2**-10 <= 0.001: the extremes
    assert median_interval(range(40, 0, -1), 0.001) == (10, 31)  # P(Bin(40, 1/2) <= 9) = 0.0003 <= 0.001 < P(<= 10)
    assert median_interval(range(1, 41), 0.05)[0] > 10  # a looser error rate, a tighter bound


def test_a_byte_identical_model_is_never_refused_as_slow_under_heavy_load():
    """Both versions alike, each request's time scattered by a factor of about 1.6 (sigma 0.5) with a 3x spike on
    one request in ten: single rounds are often far over the 1.5x bound, which refused such models before."""
    device, over = FakeDevice(0, 0.25, 1.0, 0.5, 0.1), 0
    for _ in range(1000):
        took = {}
        for version in (PREVIOUS, CANDIDATE):
            start = device.now
            device.infer(version)
            took[version] = device.now - start
        over += took[CANDIDATE] > CANARY.latency_factor * took[PREVIOUS] + CANARY.latency_slack_ms / 1000
    assert over > 100, f"the simulated load is too quiet to test anything ({over} of 1000 rounds over the bound)"

    counts = verdicts(1.0, 0.5, 0.1)
    assert counts[SLOW] == 0, counts
    assert counts[PASS] >= 0.99 * sum(counts.values()), counts


def test_a_model_twice_as_slow_is_refused():
    assert verdicts(2.0, 0.1) == {PASS: 0, SLOW: 300, INCONCLUSIVE: 0}  # quiet: verified slow
    noisy = verdicts(2.0, 0.3)  # noisy: verified slow or undecided, both refuse the install
    assert noisy[SLOW] > 0 and noisy[PASS] <= 0.02 * sum(noisy.values()), noisy


def test_rounds_alternate_the_order_and_skip_the_warm_up_round():
    device = FakeDevice(0, 0.1, 1.0, 0.0)
    verdict = gate(device)
    assert verdict.verdict == PASS and verdict.rounds == CANARY.latency_min_rounds  # steady: decided at once
    assert device.calls == [PREVIOUS, CANDIDATE, CANDIDATE, PREVIOUS] * 5 + [PREVIOUS, CANDIDATE]
    assert verdict.ratio == pytest.approx(1.0) and verdict.candidate_ms == pytest.approx(100.0)


def test_undecided_rounds_go_on_to_the_maximum_and_then_the_median_decides():
    bound = CANARY.latency_factor * 0.1 + CANARY.latency_slack_ms / 1000

    def pairs(over: int, under: int) -> list[tuple[float, float]]:
        return [(0.1, 1.1 * bound)] * over + [(0.1, 0.9 * bound)] * under

    judge = dict(factor=CANARY.latency_factor, slack_s=CANARY.latency_slack_ms / 1000, alpha=0.001, pass_alpha=0.05)
    assert judge_latency(pairs(20, 20), **judge, final=False).verdict == "undecided"
    assert judge_latency(pairs(20, 20), **judge).verdict == PASS  # the median is on the bound
    assert judge_latency(pairs(22, 18), **judge).verdict == INCONCLUSIVE
    assert judge_latency(pairs(40, 0), **judge).verdict == SLOW
    assert judge_latency(pairs(0, 40), **judge).verdict == PASS
    with pytest.raises(ValueError):
        judge_latency([], **judge)


def test_check_latency_raises_the_gates_errors():
    class Unreachable:
        def infer_detector(self, version, probe):
            raise TritonControlError("connection refused")

    slow = FakeDevice(0, 0.1, 4.0, 0.05)
    with pytest.raises(HealthGateError, match="v2 is too slow: over 10 interleaved rounds v2 took 4.0") as refused:
        check_latency(slow, CANDIDATE, PREVIOUS, None, CANARY, clock=slow.clock)
    assert not isinstance(refused.value, GateInconclusiveError)
    steady = FakeDevice(0, 0.1, 1.0, 0.05)
    report = check_latency(steady, CANDIDATE, PREVIOUS, None, CANARY, clock=steady.clock)
    assert report["verdict"] == PASS and report["factor"] == CANARY.latency_factor and report["rounds"] == 10
    with pytest.raises(HealthGateError, match="latency round failed") as failed:
        check_latency(Unreachable(), CANDIDATE, PREVIOUS, None, CANARY)
    assert isinstance(failed.value.__cause__, TritonControlError)


def test_check_latency_too_noisy_is_inconclusive_not_slow():
    class Alternating(FakeDevice):
        """The candidate is over the bound in three rounds of five, just under it in the others."""

        def infer(self, version):
            self.calls.append(version)
            n = len(self.calls) // 2
            self.now += 0.1 if version == PREVIOUS else (0.2 if n % 5 < 3 else 0.17)

    device = Alternating(0, 0.1, 1.0, 0.0)
    with pytest.raises(GateInconclusiveError, match="undecided, too much noise: over 40 interleaved rounds"):
        check_latency(device, CANDIDATE, PREVIOUS, None, CANARY, clock=device.clock)
