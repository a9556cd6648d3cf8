"""Which devices each stage of a rollout updates: deterministic, stratified by device class, nested.

A device's class is its registration's first (most specific) class. Within each class the devices are ranked by
a hash of (rollout id, device id), so the order is stable for a rollout, different between rollouts (the same
devices are not always the canaries) and independent of registration order. Stage k takes the first
ceil(percentage_k / 100 x n) devices of each class of n, at least one: every class in the fleet is in the canary,
and since percentages increase, each stage contains the previous one. A device that registers mid-rollout is
ranked by the same rule among its class as it is then. Devices for which the release has no bundle
(Release.bundle_for over all their classes) are ineligible and listed with the reason.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from fleet.protocol import Registration, Release


def device_class(registration: Registration) -> str:
    return registration.device_classes[0]


def rank_key(rollout_id: str, device_id: str) -> bytes:
    return hashlib.blake2b(f"{rollout_id}/{device_id}".encode(), digest_size=8).digest()


def stage_size(percentage: float, n: int) -> int:
    """Devices of a class of n that a stage of `percentage` takes: ceil, at least one (none of none)."""
    if n <= 0:
        return 0
    # round() first so 10% of 30 is 3, not 4 from 3.0000000000000004
    return min(n, max(1, math.ceil(round(percentage * n / 100.0, 9))))


@dataclass(frozen=True)
class Cohorts:
    """stage_of: device -> index of the first stage that takes it; ineligible: device -> why not."""
    stage_of: dict[str, int]
    ineligible: dict[str, str]
    classes: dict[str, str]  # eligible device -> its class

    def members(self, stage: int) -> set[str]:
        """Devices updated once stage `stage` has started (it and every earlier stage)."""
        return {d for d, k in self.stage_of.items() if k <= stage}

    def class_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for cls in self.classes.values():
            sizes[cls] = sizes.get(cls, 0) + 1
        return sizes


def plan_cohorts(rollout_id: str, registrations: Mapping[str, Registration], release: Release,
                 percentages: Sequence[float]) -> Cohorts:
    """Each eligible device's first stage, and the ineligible devices with the reason."""
    by_class: dict[str, list[str]] = {}
    ineligible: dict[str, str] = {}
    classes: dict[str, str] = {}
    for device_id, registration in registrations.items():
        if registration.model != release.model:
            ineligible[device_id] = f"serves model {registration.model}, the release is for {release.model}"
        elif release.bundle_for(registration.device_classes) is None:
            ineligible[device_id] = (f"no bundle for its classes {', '.join(registration.device_classes)} "
                                     f"(release has {', '.join(sorted(release.bundles))})")
        else:
            cls = device_class(registration)
            classes[device_id] = cls
            by_class.setdefault(cls, []).append(device_id)
    stage_of: dict[str, int] = {}
    for devices in by_class.values():
        devices.sort(key=lambda d: rank_key(rollout_id, d))
        start = 0
        for stage, percentage in enumerate(percentages):
            end = stage_size(percentage, len(devices))
            for device_id in devices[start:end]:
                stage_of[device_id] = stage
            start = max(start, end)
    return Cohorts(stage_of=stage_of, ineligible=ineligible, classes=classes)
