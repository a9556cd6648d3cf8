"""Energy readers on fake sysfs trees and a fake nvidia-smi; the latency budget's energy line."""
import subprocess

import pytest

from edgestack import energy as E
from edgestack.latency_budget import Budget


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def rapl_tree(root, uj, max_uj=1_000_000_000):
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(str(uj))
    (zone / "max_energy_range_uj").write_text(str(max_uj))
    sub = zone / "intel-rapl:0:0"  # a subzone: counted by the package already, never summed
    sub.mkdir(exist_ok=True)
    (sub / "energy_uj").write_text("5")


def test_rapl_joules_over_the_window_through_power_meter(tmp_path):
    clock = Clock()
    rapl_tree(tmp_path, 1_000_000)
    meter = E.RaplMeter(tmp_path, clock=clock)
    assert meter.unreadable() is None
    meter.start()
    clock.now += 2.0
    rapl_tree(tmp_path, 1_000_000 + 30_000_000)  # 30 J in 2 s
    used = meter.stop()
    assert used.source == "rapl" and used.joules == pytest.approx(30.0) and used.watts == pytest.approx(15.0)
    assert used.per(10) == pytest.approx(3.0)


def test_rapl_counter_wrap(tmp_path):
    clock = Clock()
    rapl_tree(tmp_path, 990, max_uj=1000)
    meter = E.RaplMeter(tmp_path, clock=clock)
    meter.start()
    clock.now += 1.0
    rapl_tree(tmp_path, 10, max_uj=1000)  # wrapped: 20 uJ
    assert meter.stop().joules == pytest.approx(20e-6)


def test_rapl_absent_says_why(tmp_path):
    assert "no energy counter" in E.RaplMeter(tmp_path / "none").unreadable()


def test_sampled_meter_integrates_a_constant_draw():
    meter = E.SampledMeter("fake", lambda: 12.5, lambda: None, interval_s=0.001)
    meter.start()
    for _ in range(200):  # let the thread take a few samples, no fixed sleep needed
        if len(meter._samples) >= 3:
            break
        meter._stop.wait(0.005)
    used = meter.stop()
    assert used.seconds > 0 and used.joules == pytest.approx(12.5 * used.seconds)


def test_ina3221_iio_and_hwmon_rails_are_summed(tmp_path):
    iio = tmp_path / "iio" / "1-0040" / "iio:device0"
    iio.mkdir(parents=True)
    (iio / "in_power0_input").write_text("2000")  # mW
    (iio / "in_power1_input").write_text("500")
    hw = tmp_path / "hw" / "1-0041" / "hwmon" / "hwmon3"
    hw.mkdir(parents=True)
    (hw / "in1_input").write_text("5000")  # mV
    (hw / "curr1_input").write_text("400")  # mA -> 2 W
    (hw / "in2_input").write_text("3300")  # no current channel: not a rail
    meter = E.ina3221_meter(str(tmp_path / "iio/*/iio:device*/in_power*_input"), str(tmp_path / "hw/*/hwmon/hwmon*"))
    assert meter.unreadable() is None
    assert meter.read_watts() == pytest.approx(2.0 + 0.5 + 2.0)
    assert "no Jetson power rails" in E.ina3221_meter(str(tmp_path / "x"), str(tmp_path / "y")).unreadable()


def test_nvidia_smi_parsing():
    def run(out, code=0):
        return lambda *a, **k: subprocess.CompletedProcess(a, code, stdout=out, stderr="")

    assert E.nvidia_smi_watts(run("71.20\n35.5\n")) == pytest.approx(106.7)
    assert E.nvidia_smi_watts(run("[N/A]\n")) is None
    assert E.nvidia_smi_watts(run("70\n", code=9)) is None

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert E.nvidia_smi_watts(missing) is None


class Fake:
    def __init__(self, name, why):
        self.name, self.why = name, why

    def unreadable(self):
        return self.why


def test_find_meter_first_readable_or_all_reasons():
    meter, reasons = E.find_meter([Fake("a", "A: none"), Fake("b", None), Fake("c", None)])
    assert meter.name == "b" and reasons == ["A: none"]
    meter, reasons = E.find_meter([Fake("a", "A: none"), Fake("c", "C: root only")])
    assert meter is None
    assert E.not_readable(reasons) == "energy: not readable here (A: none; C: root only)"


def budget(**kw):
    return Budget(url="u", model="detect", requests=10, images=2, client_total_median_ms=10, client_total_mean_ms=10,
                  client_total_p90_ms=12, serialization_ms=0.1, deserialization_ms=0.1, ensemble_ms=9,
                  ensemble_queue_ms=0.1, ensemble_requests=10, **kw)


def test_budget_shows_energy_or_says_not_readable():
    shown = budget(joules_per_inference=0.42, energy_note="rapl: 14.00 W average over 0.30 s, whole package/board")
    assert "Energy per inference: 0.4200 J (rapl" in shown.table()
    assert Budget.from_dict(shown.to_dict()) == shown
    missing = budget(energy_note=E.not_readable(["RAPL: no energy counter under /sys/class/powercap"]))
    assert "energy: not readable here (RAPL" in missing.table()
