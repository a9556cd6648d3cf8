"""fleet.cohorts: stratified, deterministic, nested cohorts; every class in the canary; ineligible devices
listed; a device registering later is placed by the same rule."""
from __future__ import annotations

import math

from fleet.cohorts import plan_cohorts, stage_size
from fleet.protocol import BundleRef, Registration, Release

PERCENTAGES = [1, 10, 100]
BUNDLE = BundleRef(url="http://b/x.bundle", sha256="cd" * 32, size=10)
RELEASE = Release(model="detect_detector", version="2.0.0",
                  bundles={"x86-avx2": BUNDLE, "x86-vnni": BUNDLE, "arm64-neon": BUNDLE})


def fleet(sizes: dict[str, int]) -> dict[str, Registration]:
    return {f"{c}-{i}": Registration(device_id=f"{c}-{i}", device_classes=(c, "cpu"), target="cpu",
                                     model="detect_detector") for c, n in sizes.items() for i in range(n)}


def test_each_stage_takes_the_ceiling_of_its_share_of_each_class_at_least_one():
    regs = fleet({"x86-avx2": 900, "x86-vnni": 95, "arm64-neon": 5})
    cohorts = plan_cohorts("r1", regs, RELEASE, PERCENTAGES)
    for stage, pct in enumerate(PERCENTAGES):
        members = cohorts.members(stage)
        for cls, n in (("x86-avx2", 900), ("x86-vnni", 95), ("arm64-neon", 5)):
            got = sum(1 for d in members if cohorts.classes[d] == cls)
            assert got == max(1, math.ceil(pct * n / 100)) == stage_size(pct, n)
    assert {cohorts.classes[d] for d in cohorts.members(0)} == {"x86-avx2", "x86-vnni", "arm64-neon"}
    assert cohorts.members(0) <= cohorts.members(1) <= cohorts.members(2) == set(regs)


def test_stage_size_rounds_exact_shares_exactly():
    assert stage_size(10, 30) == 3 and stage_size(1, 1) == 1 and stage_size(50, 0) == 0 and stage_size(0.5, 3) == 1


def test_cohorts_are_deterministic_per_rollout_and_differ_between_rollouts():
    regs = fleet({"x86-avx2": 500})
    shuffled = dict(reversed(list(regs.items())))
    a = plan_cohorts("r1", regs, RELEASE, PERCENTAGES).members(1)
    assert a == plan_cohorts("r1", shuffled, RELEASE, PERCENTAGES).members(1)
    assert a != plan_cohorts("r2", regs, RELEASE, PERCENTAGES).members(1)


def test_devices_without_a_bundle_or_of_another_model_are_ineligible_and_listed():
    regs = fleet({"x86-avx2": 10, "jetson-orin": 3})
    regs["other"] = Registration(device_id="other", device_classes=("x86-avx2",), target="cpu", model="face")
    regs["fallback"] = Registration(device_id="fallback", device_classes=("x86-avx512", "x86-avx2"), target="cpu",
                                    model="detect_detector")
    cohorts = plan_cohorts("r1", regs, RELEASE, PERCENTAGES)
    assert sorted(cohorts.ineligible) == ["jetson-orin-0", "jetson-orin-1", "jetson-orin-2", "other"]
    assert "no bundle for its classes jetson-orin, cpu" in cohorts.ineligible["jetson-orin-0"]
    assert "serves model face" in cohorts.ineligible["other"]
    # eligible through its second class, stratified by its first
    assert cohorts.classes["fallback"] == "x86-avx512" and cohorts.stage_of["fallback"] == 0


def test_a_late_device_is_placed_by_the_same_rule_and_earlier_placements_mostly_stay():
    regs = fleet({"x86-avx2": 200})
    before = plan_cohorts("r1", regs, RELEASE, PERCENTAGES)
    regs["x86-avx2-late"] = Registration(device_id="x86-avx2-late", device_classes=("x86-avx2",), target="cpu",
                                         model="detect_detector")
    after = plan_cohorts("r1", regs, RELEASE, PERCENTAGES)
    assert "x86-avx2-late" in after.stage_of
    moved = [d for d in before.stage_of if before.stage_of[d] != after.stage_of[d]]
    assert len(moved) <= 2  # at most the devices at a stage boundary shift by one place
