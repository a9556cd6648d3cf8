"""Package power in watts from RAPL energy counters (/sys/class/powercap/<zone>/energy_uj), per interval.

Only top-level zones (intel-rapl:0, intel-rapl:1, ...; not their subzones, which the package already counts) are
summed. A counter wraps at its max_energy_range_uj. Where no zone is readable (no RAPL, a VM, a container,
counters readable by root only since the PLATYPUS mitigation) the meter says so once in the log and reports None.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

log = logging.getLogger("fleet.power")

POWERCAP = Path("/sys/class/powercap")
_TOP_ZONE = re.compile(r"^[a-z-]+:\d+$")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class PowerMeter:
    def __init__(self, root: Path = POWERCAP, clock=time.monotonic):
        self.root = Path(root)
        self.clock = clock
        self._last: tuple[float, dict[Path, int]] | None = None
        self._said_unreadable = False

    def zones(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if _TOP_ZONE.match(p.name) and (p / "energy_uj").exists())
        except OSError:
            return []

    def _energy(self) -> dict[Path, int]:
        return {zone: value for zone in self.zones() if (value := _read_int(zone / "energy_uj")) is not None}

    def sample(self) -> float | None:
        """Average watts since the previous sample; None on the first, or where no energy counter is readable."""
        now, energy = self.clock(), self._energy()
        if not energy:
            if not self._said_unreadable:
                log.info("no readable RAPL energy counter under %s: power is not reported", self.root)
                self._said_unreadable = True
            self._last = None
            return None
        last, self._last = self._last, (now, energy)
        if last is None or now <= last[0] or set(last[1]) != set(energy):
            return None
        joules = 0.0
        for zone, value in energy.items():
            delta = value - last[1][zone]
            if delta < 0:  # wrapped
                delta += _read_int(zone / "max_energy_range_uj") or 0
            joules += max(delta, 0) / 1e6
        return joules / (now - last[0])
