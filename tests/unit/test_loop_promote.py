"""Promotion: the margin on every shared device class, and what promote() starts or proposes."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fleet.protocol import BundleRef, Release
from loop.errors import PromotionError
from loop.promote import decide, promote

OLD = {"x86-avx2": {"fidelity_map": 0.90}, "x86-vnni": {"fidelity_map": 0.92}}


def test_better_by_the_margin_everywhere():
    new = {"x86-avx2": {"fidelity_map": 0.93}, "x86-vnni": {"fidelity_map": 0.94}, "arm": {"fidelity_map": 0.1}}
    decision = decide("det", "1.1.0", new, "production", OLD, margin=0.02)
    assert decision.better and set(decision.per_class) == {"x86-avx2", "x86-vnni"}


def test_short_of_the_margin_on_one_class_is_refused_with_the_class():
    new = {"x86-avx2": {"fidelity_map": 0.95}, "x86-vnni": {"fidelity_map": 0.925}}
    decision = decide("det", "1.1.0", new, "production", OLD, margin=0.01)
    assert not decision.better and "x86-vnni" in decision.reason


def test_nothing_to_compare_is_an_error():
    with pytest.raises(PromotionError, match="share no measured device class"):
        decide("det", "1.1.0", {"arm": {"fidelity_map": 1.0}}, "production", OLD)
    with pytest.raises(PromotionError, match="fidelity_map not measured"):
        decide("det", "1.1.0", {"x86-avx2": {}}, "production", OLD)


class FakeRegistry:
    def __init__(self, metrics):
        self.metrics = metrics

    def show(self, model, ref):
        return SimpleNamespace(metrics=self.metrics[ref])

    def resolve(self, model, ref):
        return Release(model=model, version="1.1.0",
                       bundles={"x86-avx2": BundleRef("http://x/b.tar", "0" * 64, 10)}, metrics=self.metrics[ref])


def test_promote_proposes_or_starts_a_rollout(monkeypatch):
    registry = FakeRegistry({"1.1.0": {"x86-avx2": {"fidelity_map": 0.95}}, "production": OLD})
    proposal = asyncio.run(promote(registry, None, "det", "1.1.0", "production", strategy=None, propose_only=True))
    assert proposal["action"] == "proposed" and proposal["rollout_id"] == "det-1_1_0"
    started = {}

    async def fake_start(bus, rollout_id, release, strategy, now):
        started.update(rollout_id=rollout_id, version=release.version, strategy=strategy)
        return SimpleNamespace(state=SimpleNamespace(value="pending"))

    monkeypatch.setattr("fleet.rollout_cli.start_rollout", fake_start)
    result = asyncio.run(promote(registry, object(), "det", "1.1.0", "production", strategy="canary"))
    assert result["action"] == "started" and started == {"rollout_id": "det-1_1_0", "version": "1.1.0",
                                                         "strategy": "canary"}
    worse = FakeRegistry({"1.1.0": {"x86-avx2": {"fidelity_map": 0.80}}, "production": OLD})
    assert asyncio.run(promote(worse, object(), "det", "1.1.0", "production", strategy=None))["action"] == "none"
