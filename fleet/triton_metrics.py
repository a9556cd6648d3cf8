"""One model's request counts and latency quantiles from Triton's Prometheus endpoint, per reporting interval.

Triton (started with `--metrics-config summary_latencies=true`, as edgestack.server does) exports
  nv_inference_request_success{model,version}          counter
  nv_inference_request_failure{model,version,reason}   counter
  nv_inference_request_summary_us{model,version,quantile}  summary of end-to-end request time (microseconds)
IntervalMetrics turns two scrapes into the interval's requests, error rate (failures / requests, percent) and the
summary's p50/p99. The counters start again at zero when Triton restarts: a counter below the last scrape is a
reset, and the interval counts what the new process counted. Summaries are Triton's own sliding window, so the
quantiles are those of the recent requests, reported only when the interval had requests.
"""
from __future__ import annotations

import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("fleet.triton_metrics")

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
LATENCY_SUMMARY = "nv_inference_request_summary_us"


@dataclass(frozen=True)
class ModelCounters:
    """One scrape, for one model (all its versions together)."""
    success: float = 0.0
    failure: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None


@dataclass(frozen=True)
class Interval:
    requests: int
    failures: int
    error_rate: float | None  # percent; None without requests
    p50_ms: float | None
    p99_ms: float | None
    reset: bool  # a counter went down: Triton restarted during the interval


def parse_model_counters(text: str, model: str) -> ModelCounters:
    """The model's counters and latency quantiles in a Prometheus text exposition (other models ignored)."""
    success = failure = 0.0
    quantiles: dict[float, tuple[float, float]] = {}  # quantile -> (value, observations) of the busiest version
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            name, version = sample.name.removesuffix("_total"), sample.labels.get("version", "")
            if name == SUCCESS:
                success += sample.value
            elif name == FAILURE:
                failure += sample.value
            elif name == LATENCY_SUMMARY + "_count":
                counts[version] = sample.value
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != LATENCY_SUMMARY or sample.labels.get("model") != model:
                continue
            q, value = float(sample.labels.get("quantile", "nan")), sample.value
            observations = counts.get(sample.labels.get("version", ""), 0.0)
            if math.isfinite(value) and (q not in quantiles or observations > quantiles[q][1]):
                quantiles[q] = (value, observations)
    p50, p99 = quantiles.get(0.5), quantiles.get(0.99)
    return ModelCounters(success, failure, p50[0] if p50 else None, p99[0] if p99 else None)


def interval_between(before: ModelCounters | None, now: ModelCounters) -> Interval:
    """What happened between two scrapes; a first scrape (before None) counts nothing yet."""
    if before is None:
        return Interval(0, 0, None, None, None, reset=False)
    reset = now.success < before.success or now.failure < before.failure
    start = ModelCounters() if reset else before
    ok, failures = int(round(now.success - start.success)), int(round(now.failure - start.failure))
    requests = ok + failures
    if requests <= 0:
        return Interval(0, 0, None, None, None, reset)
    p50 = None if now.p50_us is None else now.p50_us / 1000.0
    p99 = None if now.p99_us is None else now.p99_us / 1000.0
    if p50 is not None and p99 is not None and p99 < p50:  # separate sliding windows; never report p99 < p50
        p99 = p50
    return Interval(requests, failures, 100.0 * failures / requests, p50, p99, reset)


class IntervalMetrics:
    """Scrape Triton's /metrics for one model; each sample() is the interval since the previous one. An
    unreachable endpoint gives None (the device keeps serving and reports no measurement)."""

    def __init__(self, metrics_url: str, model: str, timeout_s: float = 3.0):
        url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
        self.url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
        self.model = model
        self.timeout_s = timeout_s
        self._last: ModelCounters | None = None

    def scrape(self) -> ModelCounters:
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
            return parse_model_counters(response.read().decode("utf-8", "replace"), self.model)

    def sample(self) -> Interval | None:
        try:
            now = self.scrape()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("Triton metrics at %s unreadable: %s", self.url, exc)
            return None
        interval, self._last = interval_between(self._last, now), now
        if interval.reset:
            log.info("Triton's counters for %s started again (Triton restarted)", self.model)
        return interval
