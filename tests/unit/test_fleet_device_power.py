"""fleet.power: RAPL package energy counters -> watts per interval, wrap-around, and None where unreadable."""
from fleet.power import PowerMeter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def zone(root, name, energy, max_range=1_000_000_000):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "energy_uj").write_text(f"{energy}\n")
    (folder / "max_energy_range_uj").write_text(f"{max_range}\n")


def test_watts_are_joules_of_the_top_level_zones_over_the_interval(tmp_path):
    clock = Clock()
    zone(tmp_path, "intel-rapl:0", 1_000_000)
    zone(tmp_path, "intel-rapl:1", 2_000_000)
    zone(tmp_path, "intel-rapl:0:0", 0)  # a subzone: already inside its package
    meter = PowerMeter(tmp_path, clock)
    assert meter.sample() is None  # first sample: nothing to compare with
    zone(tmp_path, "intel-rapl:0", 11_000_000)
    zone(tmp_path, "intel-rapl:1", 12_000_000)
    zone(tmp_path, "intel-rapl:0:0", 500_000_000)
    clock.now += 2.0
    assert meter.sample() == 10.0  # 20 J in 2 s


def test_a_wrapped_counter_counts_through_its_range(tmp_path):
    clock = Clock()
    zone(tmp_path, "intel-rapl:0", 999_000_000)
    meter = PowerMeter(tmp_path, clock)
    meter.sample()
    zone(tmp_path, "intel-rapl:0", 1_000_000)
    clock.now += 1.0
    assert meter.sample() == 2.0


def test_no_readable_counter_is_none_said_once(tmp_path, caplog):
    meter = PowerMeter(tmp_path / "absent", Clock())
    with caplog.at_level("INFO", logger="fleet.power"):
        assert meter.sample() is None and meter.sample() is None
    assert len([r for r in caplog.records if "power is not reported" in r.message]) == 1
