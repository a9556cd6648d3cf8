"""Statistics window of the latency budget: late ensemble accounting is waited for."""
from __future__ import annotations

from edgestack.latency_budget import _settled_stats


class LateEnsembleStats:
    """Statistics endpoint whose ensemble count reaches 10 only after `lag_reads` reads (as Triton's may, when it
    counts a request at its release, after the response)."""

    def __init__(self, lag_reads: int):
        self.reads = 0
        self.lag_reads = lag_reads

    def get_inference_statistics(self, name, as_json=True):
        if name == "detect":
            self.reads += 1
        count = 10 if name != "detect" or self.reads > self.lag_reads else 9
        return {"model_stats": [{"inference_stats": {"success": {"count": count, "ns": count * 1000}}}]}


def test_waits_until_the_ensemble_count_settles():
    client = LateEnsembleStats(lag_reads=1)  # 9, then 10 and 10: two reads agree
    stats = _settled_stats(client, ["detect", "detect_detector"], interval_s=0.001)
    assert stats["detect"]["count"] == 10 == stats["detect_detector"]["count"]


def test_a_count_that_is_stable_but_short_of_the_requests_sent_is_waited_for():
    client = LateEnsembleStats(lag_reads=5)  # reads 1-5 agree on 9: stable, but one request is not counted yet
    stats = _settled_stats(client, ["detect"], {"detect": 10}, interval_s=0.001)
    assert stats["detect"]["count"] == 10 and client.reads > 5


def test_stable_statistics_are_read_twice_only():
    client = LateEnsembleStats(lag_reads=0)
    stats = _settled_stats(client, ["detect"], {"detect": 10}, interval_s=0.001)
    assert stats["detect"]["count"] == 10 and client.reads == 2


def test_never_settling_gives_up_after_the_timeout():
    class Growing:
        n = 0

        def get_inference_statistics(self, name, as_json=True):
            self.n += 1
            return {"model_stats": [{"inference_stats": {"success": {"count": self.n}}}]}

    stats = _settled_stats(Growing(), ["detect"], interval_s=0.001, timeout_s=0.3)
    assert stats["detect"]["count"] > 1
