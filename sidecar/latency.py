"""The health gate's latency check: the candidate against the previous version under the load of the moment.

Each round times one request on each version, back to back, in alternating order, so whatever load the device
carries hits both alike. A round's share = candidate / (latency_factor x previous + latency_slack_ms): above 1,
the candidate was over the stage's bound in that round. The spread of the shares over the rounds is the noise,
and the verdict comes from distribution-free confidence bounds of their median (order statistics of the sign
test), with a small error rate for a refusal (latency_alpha: it blocks the bundle) and a larger one for passing
early (latency_pass_alpha: probation still watches the version's compute time):

  SLOW          the lower bound is above 1: verified slower than the bound (the bundle is bad)
  PASS          the upper bound is at or below 1; or, after latency_max_rounds, the median is at or below 1
  INCONCLUSIVE  after latency_max_rounds the bounds still straddle 1 and the median is above it: too much
                noise to tell, which says nothing against the bundle (GateInconclusiveError)

Rounds are added one at a time from latency_min_rounds on while the bounds straddle 1.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sidecar.errors import GateInconclusiveError, HealthGateError, TritonControlError

PASS, SLOW, INCONCLUSIVE, UNDECIDED = "pass", "slow", "inconclusive", "undecided"


def median_interval(values: Sequence[float], alpha: float) -> tuple[float, float]:
    """(low, high): the k-th smallest and k-th largest values, k the largest with P(Binomial(n, 1/2) < k) <= alpha,
    so the median lies below low, or above high, each with probability <= alpha; (-inf, inf) when n is too small."""
    ordered = sorted(values)
    n = len(ordered)
    k, tail = 0, 0.0
    while k < (n + 1) // 2:
        tail += math.comb(n, k) / 2 ** n
        if tail > alpha:
            break
        k += 1
    if k == 0:
        return -math.inf, math.inf
    return ordered[k - 1], ordered[n - k]


@dataclass(frozen=True)
class LatencyVerdict:
    verdict: str  # PASS, SLOW, INCONCLUSIVE (UNDECIDED: more rounds wanted)
    rounds: int
    candidate_ms: float  # medians over the rounds
    previous_ms: float
    ratio: float  # median of candidate / previous per round
    share: float  # median share of the bound
    share_low: float  # its lower confidence bound (alpha) and upper one (pass_alpha)
    share_high: float

    def to_dict(self) -> dict[str, Any]:
        def finite(v):
            return round(v, 3) if math.isfinite(v) else None
        return {"verdict": self.verdict, "rounds": self.rounds, "candidate": round(self.candidate_ms, 2),
                "previous": round(self.previous_ms, 2), "ratio": round(self.ratio, 3),
                "share_of_bound": [finite(self.share_low), round(self.share, 3), finite(self.share_high)]}


def judge_latency(pairs: Sequence[tuple[float, float]], factor: float, slack_s: float, alpha: float,
                  pass_alpha: float, final: bool = True) -> LatencyVerdict:
    """The verdict on (previous_s, candidate_s) rounds against the bound factor x previous + slack_s; UNDECIDED
    instead of PASS-by-median or INCONCLUSIVE when not `final`."""
    if not pairs:
        raise ValueError("no latency rounds to judge")
    shares = [cand / (factor * prev + slack_s) for prev, cand in pairs]
    low, high = median_interval(shares, alpha)[0], median_interval(shares, pass_alpha)[1]
    share = statistics.median(shares)
    if low > 1.0:
        verdict = SLOW
    elif high <= 1.0:
        verdict = PASS
    elif not final:
        verdict = UNDECIDED
    else:
        verdict = PASS if share <= 1.0 else INCONCLUSIVE
    ratio = statistics.median(cand / prev if prev > 0 else math.inf for prev, cand in pairs)
    return LatencyVerdict(verdict, len(pairs), statistics.median(c for _, c in pairs) * 1000,
                          statistics.median(p for p, _ in pairs) * 1000, ratio, share, low, high)


def measure_latency(infer: Callable[[int], Any], candidate: int, previous: int, *, factor: float, slack_ms: float,
                    alpha: float, pass_alpha: float, min_rounds: int, max_rounds: int, warmup_rounds: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> LatencyVerdict:
    """Interleaved rounds of infer(version) until the verdict is decided or max_rounds were judged; the first
    warmup_rounds rounds are not counted."""
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"latency rounds: need 1 <= min_rounds ({min_rounds}) <= max_rounds ({max_rounds})")
    pairs: list[tuple[float, float]] = []
    rounds = 0
    while True:
        took: dict[int, float] = {}
        for version in ((previous, candidate) if rounds % 2 == 0 else (candidate, previous)):
            start = clock()
            infer(version)
            took[version] = clock() - start
        rounds += 1
        if rounds <= warmup_rounds:
            continue
        pairs.append((took[previous], took[candidate]))
        if len(pairs) >= min_rounds:
            verdict = judge_latency(pairs, factor, slack_ms / 1000, alpha, pass_alpha, final=len(pairs) >= max_rounds)
            if verdict.verdict != UNDECIDED:
                return verdict


def check_latency(control, candidate: int, previous: int, probe, thresholds,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """The gate's latency check on `probe` (TritonControl, StageThresholds): the report, HealthGateError when
    verified too slow, GateInconclusiveError when too noisy to tell."""
    try:
        verdict = measure_latency(lambda version: control.infer_detector(version, probe), candidate, previous,
                                  factor=thresholds.latency_factor, slack_ms=thresholds.latency_slack_ms,
                                  alpha=thresholds.latency_alpha, pass_alpha=thresholds.latency_pass_alpha,
                                  min_rounds=thresholds.latency_min_rounds,
                                  max_rounds=thresholds.latency_max_rounds, clock=clock)
    except TritonControlError as exc:
        raise HealthGateError(f"latency round failed: {exc}") from exc
    bound = f"{thresholds.latency_factor}x v{previous}'s time + {thresholds.latency_slack_ms} ms"
    summary = (f"over {verdict.rounds} interleaved rounds v{candidate} took {verdict.ratio:.2f}x v{previous}'s time "
               f"(medians {verdict.candidate_ms:.1f} and {verdict.previous_ms:.1f} ms), {verdict.share:.2f} of the "
               f"bound {bound} (confidence bounds {verdict.share_low:.2f}-{verdict.share_high:.2f})")
    if verdict.verdict == SLOW:
        raise HealthGateError(f"v{candidate} is too slow: {summary}")
    if verdict.verdict == INCONCLUSIVE:
        raise GateInconclusiveError(f"latency of v{candidate} undecided, too much noise: {summary}")
    return {**verdict.to_dict(), "factor": thresholds.latency_factor, "slack_ms": thresholds.latency_slack_ms}
