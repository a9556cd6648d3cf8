"""Hardware tiers as data, and a planner: requirements -> tier, precision, batch, expected FPS, power, battery hours.

The six tiers of the system description (Jetson Orin NX, Jetson AGX Orin, Movidius/OpenVINO, Snapdragon QCS8275,
Arm Ethos-U55, TF Lite Micro on a Cortex-M) carry their vendor figures: peak INT8 TOPS, memory, power envelope.
Those are QUOTED (datasheet figures, not measured here); every number the planner derives from them says so.
This project's own measurements are used where it has them and are marked MEASURED: the fixture detector's MACs
(1.34 G, Torch-Pruning's count, BENCHMARKS.md "Structured pruning"), a 50%-pruned, 16-aligned student's MACs
(0.53 G, same section) for the smaller-backbone what-if, and any FPS/watts passed in from `edgestack tune` or
`edgestack bench` on this device (`--measured-fps`, `--measured-watts`).

The model (each assumption is a field a caller can change):

    peak FPS     = TOPS(int8) * precision factor * utilization * 1e12 / (2 * MACs)      (one MAC = 2 ops)
    batch b      : throughput x batch_gain(b) (capped at the peak), latency = b / FPS(b) + (b - 1) / required FPS
    p99          = latency x P99_FACTOR
    power        = idle W + (max W - idle W) x load x clock^2, load = required FPS / FPS at that clock
    battery h    = mAh / 1000 x V / average W,  average W = duty x active W + (1 - duty) x idle W

The battery formula is the system description's: 10,000 mAh at 10 V drawing 17 W lasts 10 x 10 / 17 = 5.9 h.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgestack.errors import EdgestackError

QUOTED = "quoted"
MEASURED = "measured"
ASSUMED = "assumed"

# MEASURED in this project (BENCHMARKS.md, "Structured pruning before fine-tuning"): Torch-Pruning's MAC counts.
FIXTURE_DETECTOR_GMACS = 1.34
SMALLER_BACKBONE_GMACS = 0.53  # pruned50-magnitude-r16 (needs fine-tuning to detect again; see that section)
FIXTURE_DETECTOR_MB = {"fp32": 8.2, "fp16": 4.1, "int8": 2.1, "int4": 1.1}  # fp32 measured; the rest by bit width

# ASSUMED rules of thumb, relative to a tier's quoted peak INT8 TOPS.
PRECISION_FACTOR = {"int4": 2.0, "int8": 1.0, "fp16": 0.5, "fp32": 0.25}
BATCHES = (1, 2, 4, 8)
P99_FACTOR = 1.5
ACTIVATION_FACTOR = 3.0  # weights + activations + runtime, as a multiple of the model file


class PlanError(EdgestackError):
    """Bad planner requirements: the message names the field."""


@dataclass(frozen=True)
class HardwareTier:
    """One hardware tier with its QUOTED vendor figures and the edgestack target that serves it (None: none)."""

    name: str
    title: str
    int8_tops: float
    memory_mb: float
    idle_w: float
    max_w: float
    precisions: tuple[str, ...]
    target: str | None
    # ASSUMED share of the quoted peak a small detector reaches (small models are memory-bound on the big GPUs/NPUs)
    utilization: float = 0.3
    batch_gain_per_item: float = 0.25  # ASSUMED: batch b runs at 1 + gain x (b - 1) times batch 1's throughput
    note: str = ""
    source: str = QUOTED

    def fits(self, precision: str, model_mb_fp32: float) -> bool:
        return needed_mb(precision, model_mb_fp32) <= self.memory_mb


def needed_mb(precision: str, model_mb_fp32: float) -> float:
    """Memory a model needs at precision: its file scaled by bit width, x ACTIVATION_FACTOR."""
    return model_mb_fp32 * FIXTURE_DETECTOR_MB[precision] / FIXTURE_DETECTOR_MB["fp32"] * ACTIVATION_FACTOR


TIERS: tuple[HardwareTier, ...] = (
    HardwareTier("orin-nx", "NVIDIA Jetson Orin NX 16GB", 100.0, 16384, 5.0, 25.0, ("fp16", "int8", "int4"),
                 "jetson", utilization=0.03, note="10/15/25 W power modes; 100 TOPS is sparse INT8"),
    HardwareTier("agx-orin", "NVIDIA Jetson AGX Orin 64GB", 275.0, 65536, 10.0, 60.0, ("fp16", "int8", "int4"),
                 "jetson", utilization=0.03, note="15-60 W power modes; 275 TOPS is sparse INT8"),
    HardwareTier("movidius", "Intel Movidius Myriad X VPU (OpenVINO)", 1.0, 512, 0.5, 2.5, ("fp16",),
                 "intel", note="NN engine 1 TOPS of the 4 TOPS total; FP16 only; host CPU not counted"),
    HardwareTier("qcs8275", "Qualcomm Snapdragon QCS8275 (Hexagon NPU)", 40.0, 8192, 2.0, 15.0,
                 ("fp16", "int8", "int4"), "cpu", utilization=0.03, note="edgestack serves its Kryo CPU (ONNX Runtime) today"),
    HardwareTier("ethos-u55", "Arm Ethos-U55 microNPU (256 MAC/cycle, 1 GHz)", 0.5, 2, 0.01, 0.5, ("int8",),
                 None, utilization=0.2, batch_gain_per_item=0.0, note="SRAM-bound; int8 only"),
    HardwareTier("tflite-micro", "TF Lite Micro on a Cortex-M7 (CMSIS-NN)", 0.001, 1, 0.005, 0.3, ("int8",),
                 None, utilization=0.5, batch_gain_per_item=0.0, note="microcontroller; kilobyte-scale models only"),
)
TIER_NAMES = tuple(t.name for t in TIERS)


def tier(name: str) -> HardwareTier:
    for t in TIERS:
        if t.name == name:
            return t
    raise PlanError(f"tier: unknown {name!r}; known: {', '.join(TIER_NAMES)}")


@dataclass(frozen=True)
class Requirements:
    fps: float = 1.0
    p99_ms: float | None = None
    power_w: float | None = None  # a power budget: plans drawing more do not meet it
    battery_mah: float | None = None
    battery_v: float | None = None
    duty_cycle: float = 1.0  # share of time active; 1.0 = always on
    gmacs: float = FIXTURE_DETECTOR_GMACS
    model_mb: float = FIXTURE_DETECTOR_MB["fp32"]
    clock: float = 1.0  # GPU/NPU clock as a share of the maximum (what-if: lower clock)

    def __post_init__(self) -> None:
        positive = {"fps": self.fps, "gmacs": self.gmacs, "model_mb": self.model_mb, "clock": self.clock}
        optional = {"p99_ms": self.p99_ms, "power_w": self.power_w, "battery_mah": self.battery_mah,
                    "battery_v": self.battery_v}
        for name, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
            if not value > 0:
                raise PlanError(f"{name}: must be positive, got {value}")
        if not 0 < self.duty_cycle <= 1:
            raise PlanError(f"duty_cycle: must be in (0, 1], got {self.duty_cycle}")
        if self.clock > 1:
            raise PlanError(f"clock: a share of the maximum clock, at most 1.0, got {self.clock}")
        if (self.battery_mah is None) != (self.battery_v is None):
            raise PlanError("battery_mah and battery_v: give both or neither")


def battery_hours(mah: float, volts: float, watts: float) -> float:
    """The system description's formula: stored energy (Wh = mAh / 1000 x V) over the average draw."""
    if mah <= 0 or volts <= 0 or watts <= 0:
        raise PlanError(f"battery: mAh, volts and watts must be positive, got {mah}, {volts}, {watts}")
    return mah / 1000.0 * volts / watts


def average_watts(active_w: float, idle_w: float, duty_cycle: float) -> float:
    return duty_cycle * active_w + (1 - duty_cycle) * idle_w


@dataclass(frozen=True)
class Plan:
    tier: str
    precision: str
    batch: int
    fps: float
    p99_ms: float
    active_w: float
    average_w: float
    joules_per_inference: float
    battery_h: float | None
    meets: bool
    why_not: tuple[str, ...]
    source: str  # quoted (tier figures), measured (this device's numbers) or given (--power-w)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def peak_fps(t: HardwareTier, precision: str, gmacs: float, clock: float = 1.0) -> float:
    return t.int8_tops * PRECISION_FACTOR[precision] * t.utilization * clock * 1e12 / (2 * gmacs * 1e9)


def plan_tier(t: HardwareTier, req: Requirements, precision: str, watts: float | None = None,
              fps1: float | None = None) -> Plan:
    """The smallest batch that reaches the required FPS on tier t at precision (or the fastest if none does).

    watts: the active draw when known (given or measured) instead of the tier's envelope model; fps1: measured
    batch-1 throughput instead of the quoted-TOPS estimate."""
    base = fps1 if fps1 is not None else peak_fps(t, precision, req.gmacs, req.clock)
    best = None
    for b in BATCHES:
        fps = base * (1 + t.batch_gain_per_item * (b - 1))
        latency_ms = (b / fps + (b - 1) / req.fps) * 1000
        best = (b, fps, latency_ms * P99_FACTOR)
        if fps >= req.fps:
            break
    batch, fps, p99 = best
    load = min(req.fps / fps, 1.0)
    unknown = watts is None and t.source == MEASURED  # this device without a power reading
    active = watts if watts is not None else t.idle_w + (t.max_w - t.idle_w) * load * req.clock ** 2
    if unknown:
        active = float("nan")
    average = average_watts(active, t.idle_w, req.duty_cycle)
    served_fps = min(fps, req.fps)
    why = []
    if fps < req.fps:
        why.append(f"fps {fps:.1f} < {req.fps:g}")
    if req.p99_ms is not None and p99 > req.p99_ms:
        why.append(f"p99 {p99:.0f} ms > {req.p99_ms:g}")
    if req.power_w is not None and unknown:
        why.append("power not measured here")
    if req.power_w is not None and active > req.power_w:
        why.append(f"power {active:.2f} W > {req.power_w:g}")
    if not t.fits(precision, req.model_mb):
        why.append(f"memory: ~{needed_mb(precision, req.model_mb):.1f} MB at {precision} > {t.memory_mb:g} MB")
    hours = battery_hours(req.battery_mah, req.battery_v, average) if req.battery_mah and not unknown else None
    source = t.source if watts is None else ("measured" if t.source == MEASURED else "given")
    return Plan(t.name, precision, batch, fps, p99, active, average, active / served_fps, hours, not why,
                tuple(why), source)


def measured_tier(fps: float, watts: float | None, target: str = "cpu") -> HardwareTier:
    """This device as a tier, from its MEASURED FPS (and watts where readable); idle draw taken as 0 if unknown."""
    return HardwareTier("this-device", "this device (measured)", 0.0, float("inf"), 0.0, watts or 1.0, ("fp32",),
                        target, note=f"{fps:.1f} img/s measured", source=MEASURED)


def plan(req: Requirements, tiers: tuple[HardwareTier, ...] = TIERS, power_w: float | None = None,
         measured: tuple[float, float | None] | None = None, precisions: tuple[str, ...] | None = None) -> list[Plan]:
    """Every tier x precision, best first: plans that meet the requirements by lowest average power, then the rest.

    power_w: a GIVEN active draw for every plan (the battery example's 17 W). measured: (fps, watts) of this device.
    precisions: only these (default: each tier's own).
    """
    for p in precisions or ():
        if p not in PRECISION_FACTOR:
            raise PlanError(f"precision: unknown {p!r}; known: {', '.join(PRECISION_FACTOR)}")
    plans = [plan_tier(t, req, p, watts=power_w) for t in tiers for p in t.precisions
             if precisions is None or p in precisions]
    if measured is not None:
        fps, watts = measured
        plans.append(plan_tier(measured_tier(fps, watts), req, "fp32", watts=power_w or watts, fps1=fps))
    return sorted(plans, key=lambda p: (not p.meets, p.average_w if p.average_w == p.average_w else float("inf"), -p.fps))


def what_ifs(req: Requirements, chosen: Plan, power_w: float | None = None,
             clock: float = 0.7, small_gmacs: float = SMALLER_BACKBONE_GMACS) -> list[tuple[str, Plan]]:
    """The system description's what-ifs for the chosen tier: a lower clock, INT8 and INT4, a smaller backbone.

    With a given power_w, the what-ifs scale its dynamic part (above the tier's idle draw): x clock^2 for the
    clock, x the MACs/precision ratio of work per inference for precision and backbone, at the same FPS."""
    if chosen.tier == "this-device":
        return []
    t = tier(chosen.tier)
    out = []

    def given(scale: float) -> float | None:
        return None if power_w is None else t.idle_w + (power_w - t.idle_w) * scale

    lower = dataclasses.replace(req, clock=clock)
    out.append((f"GPU/NPU clock at {clock:.0%}", plan_tier(t, lower, chosen.precision, watts=given(clock ** 2))))
    for precision in ("int8", "int4"):
        if precision in t.precisions and precision != chosen.precision:
            work = PRECISION_FACTOR[chosen.precision] / PRECISION_FACTOR[precision]
            out.append((precision.upper(), plan_tier(t, req, precision, watts=given(work))))
    smaller = dataclasses.replace(req, gmacs=small_gmacs, model_mb=req.model_mb * small_gmacs / req.gmacs)
    out.append((f"smaller backbone ({small_gmacs:g} GMACs)",
                plan_tier(t, smaller, chosen.precision, watts=given(small_gmacs / req.gmacs))))
    return out
