"""Choosing the best trial for an objective.

    latency     lowest p99 at concurrency 1 (ties: higher throughput there): one camera stream
    throughput  highest images/s at the highest concurrency measured among the trials whose p99 there is within
                the SLO (all trials when no SLO is given)
    balanced    the trial closest to the best at every concurrency: highest min over levels of
                (its img/s / the best img/s at that level), p99 within the SLO at every level when given
"""
from __future__ import annotations

from builder.errors import TargetError
from builder.tune.measure import Trial

OBJECTIVES = ("latency", "throughput", "balanced")


def _score(trial: Trial, objective: str, trials: list[Trial], slo_p99_ms: float | None) -> tuple | None:
    levels = sorted(trial.levels, key=lambda lv: lv.concurrency)
    if objective == "latency":
        one = trial.at(1)
        if one is None:
            raise TargetError("tune: objective latency needs concurrency 1 among the levels measured")
        return (-one.p99_ms, one.images_per_s)
    if objective == "throughput":
        top = levels[-1]
        if slo_p99_ms is not None and top.p99_ms > slo_p99_ms:
            return None
        return (top.images_per_s, -top.p99_ms)
    if slo_p99_ms is not None and any(lv.p99_ms > slo_p99_ms for lv in levels):
        return None
    best = {lv.concurrency: max(t.at(lv.concurrency).images_per_s for t in trials) for lv in levels}
    ratios = [lv.images_per_s / best[lv.concurrency] for lv in levels if best[lv.concurrency] > 0]
    return (min(ratios, default=0.0), sum(ratios))


def choose(trials: list[Trial], objective: str, slo_p99_ms: float | None = None) -> tuple[Trial | None, str]:
    """(best trial, reason); (None, reason) when no trial ran cleanly or none meets the SLO."""
    if objective not in OBJECTIVES:
        raise TargetError(f"tune: objective {objective!r} is not one of {OBJECTIVES}")
    clean = [t for t in trials if t.ok]
    if not clean:
        return None, f"no candidate ran without errors ({len(trials)} tried)"
    scored = [(s, t) for t in clean if (s := _score(t, objective, clean, slo_p99_ms)) is not None]
    if not scored:
        return None, f"no candidate meets p99 <= {slo_p99_ms:g} ms"
    score, best = max(scored, key=lambda st: st[0])
    if objective == "latency":
        why = f"lowest p99 at concurrency 1: {-score[0]:.1f} ms ({score[1]:.2f} img/s)"
    elif objective == "throughput":
        why = f"highest throughput at concurrency {max(lv.concurrency for lv in best.levels)}: {score[0]:.2f} img/s"
    else:
        why = f"closest to the best at every concurrency: at worst {score[0]:.0%} of the best level's throughput"
    slo = f" within p99 <= {slo_p99_ms:g} ms" if slo_p99_ms is not None and objective != "latency" else ""
    return best, f"{best.candidate.label}: {why}{slo}"
