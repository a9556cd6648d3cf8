"""Energy readers: joules over a measured window, from whichever power source this device exposes.

    rapl      RAPL package energy counters under /sys/class/powercap (x86), through fleet.power.PowerMeter
              (top-level zones, wrap-around handled there): the whole CPU package, client and server alike.
    nvml      an NVIDIA GPU's board power as NVML reports it: `nvidia-smi --query-gpu=power.draw` (every GPU,
              summed) sampled in a thread every 0.1 s and integrated.
    ina3221   Jetson's INA3221 rail monitors: /sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input (mW,
              older L4T) or hwmon (/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_input mV x curr*_input mA),
              every rail summed, sampled in a thread and integrated.

`find_meter()` returns the first readable one, or None and the reasons, so a caller can say plainly
"not readable here" (RAPL counters are root-only on most kernels since the PLATYPUS mitigation; containers and
VMs often have none). Energy per inference = joules over the window / inferences in it: it includes everything
the source powers (the whole package or board), not the model alone.
"""
from __future__ import annotations

import glob
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from fleet.power import POWERCAP, PowerMeter

INA3221_IIO = "/sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power*_input"
INA3221_HWMON = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"


@dataclass(frozen=True)
class Energy:
    joules: float
    seconds: float
    source: str

    @property
    def watts(self) -> float:
        return self.joules / self.seconds if self.seconds > 0 else 0.0

    def per(self, inferences: int) -> float:
        return self.joules / inferences


class EnergyMeter(Protocol):
    name: str

    def unreadable(self) -> str | None:
        """None when readable; else why not, in words."""

    def start(self) -> None: ...

    def stop(self) -> Energy: ...


class RaplMeter:
    """RAPL package energy through fleet.power.PowerMeter: average watts over the window x its length."""

    name = "rapl"

    def __init__(self, root: Path = POWERCAP, clock: Callable[[], float] = time.monotonic):
        self.meter = PowerMeter(root, clock=clock)
        self.clock = clock
        self._t0 = 0.0

    def unreadable(self) -> str | None:
        if not self.meter.zones():
            return f"RAPL: no energy counter under {self.meter.root}"
        if not self.meter._energy():
            return f"RAPL: counters under {self.meter.root} are not readable by this user (root only)"
        return None

    def start(self) -> None:
        self.meter.sample()
        self._t0 = self.clock()

    def stop(self) -> Energy:
        watts = self.meter.sample()
        seconds = self.clock() - self._t0
        if watts is None:
            raise RuntimeError("RAPL: no energy reading for the window (zones changed or the window was empty)")
        return Energy(watts * seconds, seconds, self.name)


class SampledMeter:
    """Samples a watts reader in a thread every `interval_s` and integrates (trapezoids) between start and stop."""

    def __init__(self, name: str, read_watts: Callable[[], float | None], why_not: Callable[[], str | None],
                 interval_s: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.name, self.read_watts, self._why_not = name, read_watts, why_not
        self.interval_s, self.clock = interval_s, clock
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def unreadable(self) -> str | None:
        return self._why_not()

    def _sample(self) -> None:
        watts = self.read_watts()
        if watts is not None:
            self._samples.append((self.clock(), watts))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._samples, self._stop = [], threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name=f"energy-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> Energy:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if len(self._samples) < 2:
            raise RuntimeError(f"{self.name}: fewer than two power samples in the window")
        joules = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(self._samples, self._samples[1:]))
        return Energy(joules, self._samples[-1][0] - self._samples[0][0], self.name)


def _read_number(path: str) -> float | None:
    try:
        return float(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def ina3221_rails(iio_glob: str = INA3221_IIO, hwmon_glob: str = INA3221_HWMON) -> list[Callable[[], float | None]]:
    """One watts reader per INA3221 rail found (iio power in mW, or hwmon mV x mA)."""
    rails: list[Callable[[], float | None]] = []
    for path in sorted(glob.glob(iio_glob)):
        rails.append(lambda p=path: None if (mw := _read_number(p)) is None else mw / 1000)
    for hwmon in sorted(glob.glob(hwmon_glob)):
        for volts in sorted(glob.glob(f"{hwmon}/in*_input")):
            index = Path(volts).name[2:-len("_input")]
            current = f"{hwmon}/curr{index}_input"
            if Path(current).exists():
                def read(v=volts, c=current) -> float | None:
                    mv, ma = _read_number(v), _read_number(c)
                    return None if mv is None or ma is None else mv * ma / 1e6
                rails.append(read)
    return rails


def ina3221_meter(iio_glob: str = INA3221_IIO, hwmon_glob: str = INA3221_HWMON, **kw) -> SampledMeter:
    rails = ina3221_rails(iio_glob, hwmon_glob)

    def watts() -> float | None:
        values = [r() for r in rails]
        return None if not values or any(v is None for v in values) else sum(values)

    def why_not() -> str | None:
        if not rails:
            return "INA3221: no Jetson power rails (ina3221x iio or ina3221 hwmon)"
        return None if watts() is not None else "INA3221: rails present but not readable"

    return SampledMeter("ina3221", watts, why_not, **kw)


def nvidia_smi_watts(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> float | None:
    """Board power of every GPU, summed, from nvidia-smi; None when it fails or reports N/A."""
    try:
        out = run(["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits"],
                  capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        values = [float(line) for line in out.stdout.split() if line.strip()]
    except ValueError:
        return None
    return sum(values) if out.returncode == 0 and values else None


def nvml_meter(**kw) -> SampledMeter:
    def why_not() -> str | None:
        if shutil.which("nvidia-smi") is None:
            return "NVML: no nvidia-smi (no NVIDIA driver)"
        return None if nvidia_smi_watts() is not None else "NVML: nvidia-smi reports no power draw"

    return SampledMeter("nvml", nvidia_smi_watts, why_not, interval_s=kw.pop("interval_s", 0.1), **kw)


def default_meters() -> list[EnergyMeter]:
    return [nvml_meter(), ina3221_meter(), RaplMeter()]


def find_meter(meters: list[EnergyMeter] | None = None) -> tuple[EnergyMeter | None, list[str]]:
    """The first readable meter (GPU board, then Jetson rails, then CPU package), or None and why each is not."""
    reasons = []
    for meter in default_meters() if meters is None else meters:
        why = meter.unreadable()
        if why is None:
            return meter, reasons
        reasons.append(why)
    return None, reasons


def not_readable(reasons: list[str]) -> str:
    return "energy: not readable here (" + "; ".join(reasons) + ")"
