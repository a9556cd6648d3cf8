"""The spec's `sampling` section: when the device keeps an image for labelling, and how much it may keep.

    sampling:
      enabled: true
      spool_dir: /var/lib/edgestack/spool   # relative paths resolve against the spec's folder
      entropy_bits: 0.9          # keep when a detection's class entropy is above this (bits)
      unsure_low: 0.35           # ... or the image's best score is in [unsure_low, unsure_high)
      unsure_high: 0.5
      candidate_score: 0.05      # raw candidates at or above this score vote in a detection's class scores
      same_object_iou: 0.6       # a candidate is the same object as a detection at this IoU
      rate_per_s: 2.0            # token bucket: samples kept per second on average...
      burst: 10                  # ... and at most this many at once
      max_bytes: 268435456       # the spool's bound on disk (new samples are dropped when full)
      max_image_bytes: 900000    # bigger images are not sampled (a NATS message holds 1 MB)
      queue: 64                  # samples waiting for the spool writer; when full the sample is dropped
      device_id: edge-1
      model_version: null        # reported with each sample (null: the spec's name)

Every field has a default; a wrong one raises SamplingError naming `sampling.<field>`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from loop.errors import SamplingError

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class SamplingSettings:
    enabled: bool = False
    spool_dir: str = "spool"
    entropy_bits: float = 0.9
    unsure_low: float = 0.35
    unsure_high: float = 0.5
    candidate_score: float = 0.05
    same_object_iou: float = 0.6
    rate_per_s: float = 2.0
    burst: int = 10
    max_bytes: int = 256 * 1024 * 1024
    max_image_bytes: int = 900_000
    queue: int = 64
    device_id: str = "edge-1"
    model_version: str | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise SamplingError(f"sampling.{name} must be {what}, not {getattr(self, name)!r}")

        def number(name: str) -> bool:
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        need(isinstance(self.enabled, bool), "enabled", "true or false")
        need(isinstance(self.spool_dir, str) and bool(self.spool_dir), "spool_dir", "a folder path")
        need(number("entropy_bits") and self.entropy_bits >= 0, "entropy_bits", "a number >= 0")
        for name in ("unsure_low", "unsure_high", "candidate_score", "same_object_iou"):
            need(number(name) and 0.0 <= getattr(self, name) <= 1.0, name, "a number in [0, 1]")
        need(self.unsure_low <= self.unsure_high, "unsure_high", f">= unsure_low ({self.unsure_low})")
        need(number("rate_per_s") and self.rate_per_s > 0, "rate_per_s", "a number > 0")
        for name in ("burst", "max_bytes", "max_image_bytes", "queue"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1")
        need(isinstance(self.device_id, str) and bool(_TOKEN.match(self.device_id)), "device_id",
             "1-64 characters of [A-Za-z0-9_-]")
        need(self.model_version is None or (isinstance(self.model_version, str) and bool(self.model_version)),
             "model_version", "a non-empty string or null")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "SamplingSettings":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise SamplingError(f"sampling must be a mapping, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SamplingError(f"sampling: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
