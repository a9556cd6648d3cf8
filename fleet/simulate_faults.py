"""What a simulated fleet is made of: device classes in stated proportions, faults, a bad class, and metrics.

  ClassMix     "x86-vnni=0.4,x86-avx2=0.3,arm64-neon=0.2,cuda-sm87=0.1": the share of each device class
  FaultSpec    "offline=0.02,slow=0.05,flapping=0.03,silent=0.01,liar=0.01": the share of devices with each
               fault (at most one fault per device, the rest healthy):
                 offline   registered once, never comes up: no reports, never acts on its desired state
                 slow      installs 10x slower than the others and reports every 3rd interval
                 flapping  goes away (no reports, no installs) and comes back, again and again; a return is a
                           restart: it registers again, its report seq starts at 1, and it acts on its desired state
                 silent    registers and acts on its desired state but never reports
                 liar      reports metrics out of range (accuracy 1.7, negative latency, p99 below p50) or garbage
  BadClass     "cuda-sm87:accuracy=0.02": the new version on one class is bad: "accuracy" (fidelity drops),
               "latency" (p50/p99 up), "errors" (error rate up) or "install" (the health gate refuses it), by
               an amount (BAD_AMOUNTS by default)
  MetricModel  per-class latency, error rate, fidelity and power with noise, and what an update changes

Every parse error is a FaultSpecError (a FleetError) naming the field and what fits. Nothing here does I/O.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Mapping

from builder.device_class import check_class
from fleet.errors import FleetError
from fleet.protocol import Metrics

FAULTS = ("offline", "slow", "flapping", "silent", "liar")
BAD_EFFECTS = ("accuracy", "latency", "errors", "install")
BAD_AMOUNTS = {"accuracy": 0.10, "latency": 1.8, "errors": 8.0, "install": 0.0}

DEFAULT_CLASS_MIX = "x86-vnni=0.4,x86-avx2=0.3,arm64-neon=0.2,cuda-sm87=0.1"
DEFAULT_FAULTS = "offline=0.02,slow=0.05,flapping=0.03,silent=0.01,liar=0.01"

# A CUDA device is a Jetson: the GPU's class first (what its bundles are built for), then its CPU's.
_EXTRA_CLASSES = {"cuda-sm87": ("arm64-dotprod",), "cuda-sm72": ("arm64-neon",)}


class FaultSpecError(FleetError, ValueError):
    """A class mix, fault spec or bad-class option that does not parse."""


def _shares(text: str, what: str, names: tuple[str, ...] | None) -> dict[str, float]:
    shares: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise FaultSpecError(f"{what}: {item!r} is not NAME=FRACTION")
        if names is not None and name not in names:
            raise FaultSpecError(f"{what}: unknown name {name!r}; one of {', '.join(names)}")
        if name in shares:
            raise FaultSpecError(f"{what}: {name!r} is given twice")
        try:
            share = float(value)
        except ValueError:
            raise FaultSpecError(f"{what}: {name} = {value!r} is not a number") from None
        if not 0.0 <= share <= 1.0:
            raise FaultSpecError(f"{what}: {name} = {share:g} is not a fraction in [0, 1]")
        shares[name] = share
    total = sum(shares.values())
    if total > 1.0 + 1e-9:
        raise FaultSpecError(f"{what}: the fractions add up to {total:g}, more than 1")
    return shares


@dataclass(frozen=True)
class ClassMix:
    """Device classes and their shares of the fleet (normalised to 1)."""
    shares: Mapping[str, float]

    @classmethod
    def parse(cls, text: str = DEFAULT_CLASS_MIX) -> "ClassMix":
        raw: dict[str, float] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            try:
                check_class(name.strip())
                share = float(value) if sep else 1.0
            except ValueError as error:
                raise FaultSpecError(f"class mix: {item!r}: {error}") from None
            if share <= 0:
                raise FaultSpecError(f"class mix: {name.strip()} = {share:g} must be positive")
            raw[name.strip()] = share
        if not raw:
            raise FaultSpecError("class mix: no device class given")
        total = sum(raw.values())
        return cls({name: share / total for name, share in raw.items()})

    def counts(self, devices: int) -> dict[str, int]:
        """Whole devices per class adding up to `devices` (largest remainders), so the mix is exact, not drawn."""
        exact = {name: share * devices for name, share in self.shares.items()}
        counts = {name: int(value) for name, value in exact.items()}
        for name in sorted(exact, key=lambda n: counts[n] - exact[n])[:devices - sum(counts.values())]:
            counts[name] += 1
        return counts

    @staticmethod
    def registered_classes(device_class: str) -> tuple[str, ...]:
        return (device_class, *_EXTRA_CLASSES.get(device_class, ()))

    @staticmethod
    def target(device_class: str) -> str:
        return "jetson" if device_class.startswith("cuda-") else "cpu"


@dataclass(frozen=True)
class FaultSpec:
    """The share of devices with each fault, and how the faults behave (seconds scale with the report interval)."""
    shares: Mapping[str, float] = field(default_factory=dict)
    slow_install_factor: float = 10.0
    slow_report_every: int = 3
    flap_up_intervals: float = 8.0  # mean time up, in report intervals
    flap_down_intervals: float = 3.0  # mean time away

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        """"none", "default" (DEFAULT_FAULTS) or NAME=FRACTION pairs of FAULTS."""
        text = text.strip()
        if text in ("", "none"):
            return cls()
        return cls(_shares(DEFAULT_FAULTS if text == "default" else text, "faults", FAULTS))

    def draw(self, devices: int, rng: random.Random) -> list[str | None]:
        """The fault of each device (None: healthy): exact counts per fault, placed by the seeded generator."""
        faults: list[str | None] = []
        for name in FAULTS:
            faults += [name] * round(self.shares.get(name, 0.0) * devices)
        faults = faults[:devices] + [None] * max(0, devices - len(faults))
        rng.shuffle(faults)
        return faults

    def describe(self) -> str:
        return ", ".join(f"{name} {share:.1%}" for name, share in self.shares.items() if share) or "none"


@dataclass(frozen=True)
class BadClass:
    """The update is bad on one device class, in one way, by `amount` (None: the effect's default, BAD_AMOUNTS):
    accuracy: fidelity lost (0..1), latency: p50/p99 factor, errors: percent of requests failing."""
    device_class: str
    effect: str = "accuracy"
    amount: float | None = None

    @classmethod
    def parse(cls, text: str) -> "BadClass":
        """CLASS, CLASS:EFFECT or CLASS:EFFECT=AMOUNT (EFFECT one of BAD_EFFECTS; accuracy by default)."""
        name, _, effect = text.partition(":")
        try:
            check_class(name.strip())
        except ValueError as error:
            raise FaultSpecError(f"bad class: {error}") from None
        effect, sep, amount_text = (effect.strip() or "accuracy").partition("=")
        if effect not in BAD_EFFECTS:
            raise FaultSpecError(f"bad class: effect {effect!r} unknown; one of {', '.join(BAD_EFFECTS)}")
        amount = None
        if sep:
            try:
                amount = float(amount_text)
            except ValueError:
                raise FaultSpecError(f"bad class: {effect} amount {amount_text!r} is not a number") from None
            if effect == "install" or amount <= 0 or (effect == "accuracy" and amount > 1):
                raise FaultSpecError(f"bad class: {effect} amount {amount_text!r} does not fit: accuracy (0, 1] "
                                     f"fidelity lost, latency a factor > 0, errors percent > 0, install none")
        return cls(name.strip(), effect, amount)

    def effect_amount(self) -> float:
        return BAD_AMOUNTS[self.effect] if self.amount is None else self.amount

    def __str__(self) -> str:
        return f"{self.device_class}:{self.effect}" + ("" if self.amount is None else f"={self.amount:g}")


@dataclass(frozen=True)
class ClassProfile:
    """What one device class measures on the version it shipped with."""
    p50_ms: float
    power_w: float
    requests_per_s: float


PROFILES = {"x86-vnni": ClassProfile(38.0, 28.0, 6.0), "x86-avx512": ClassProfile(45.0, 32.0, 6.0),
            "x86-avx2": ClassProfile(66.0, 35.0, 4.0), "x86-sse": ClassProfile(140.0, 40.0, 2.0),
            "arm64-dotprod": ClassProfile(95.0, 9.0, 3.0), "arm64-neon": ClassProfile(150.0, 7.0, 2.0)}
CUDA_PROFILE = ClassProfile(14.0, 18.0, 12.0)
BASE_ACCURACY = 0.985
BASE_ERROR_RATE = 0.2  # percent


@dataclass(frozen=True)
class MetricModel:
    """Metrics of one device for one interval. An update (any version but the shipped one) is slightly faster;
    on the bad class it is worse by the effect's amount."""
    bad: BadClass | None = None

    @staticmethod
    def profile(device_class: str) -> ClassProfile:
        return PROFILES.get(device_class, CUDA_PROFILE)

    def is_bad(self, device_class: str, updated: bool) -> bool:
        return updated and self.bad is not None and self.bad.device_class == device_class

    def install_fails(self, device_class: str) -> bool:
        return self.bad is not None and self.bad.effect == "install" and self.bad.device_class == device_class

    def sample(self, device_class: str, updated: bool, interval_s: float, rng: random.Random) -> Metrics:
        profile = self.profile(device_class)
        bad = self.bad.effect if self.is_bad(device_class, updated) else None
        p50 = profile.p50_ms * rng.lognormvariate(0.0, 0.08) * (0.97 if updated else 1.0)
        accuracy = BASE_ACCURACY + rng.gauss(0.0, 0.004) + (0.002 if updated else 0.0)
        error_rate = rng.expovariate(1.0 / BASE_ERROR_RATE)
        if bad == "latency":
            p50 *= self.bad.effect_amount()
        elif bad == "accuracy":
            accuracy -= self.bad.effect_amount()
        elif bad == "errors":
            error_rate += self.bad.effect_amount()
        p99 = p50 * (1.6 + abs(rng.gauss(0.0, 0.25)))
        requests = max(0, round(profile.requests_per_s * interval_s * rng.uniform(0.7, 1.3)))
        return Metrics(requests=requests, p50_ms=round(p50, 2), p99_ms=round(p99, 2),
                       error_rate=round(min(100.0, error_rate), 3), accuracy=round(min(1.0, max(0.0, accuracy)), 4),
                       power_w=round(profile.power_w * rng.uniform(0.9, 1.1), 1))


# What a liar sends instead of a report, in turn: out-of-range metrics, then documents that are not reports.
LIES = ({"accuracy": 1.7}, {"p50_ms": -5.0}, {"error_rate": 250.0}, {"p50_ms": 80.0, "p99_ms": 20.0},
        {"power_w": 1e9}, b"{not json", b"[1, 2, 3]", b'{"seq": "three"}', b"\x00\xff garbage")
