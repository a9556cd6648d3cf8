"""The planner: the battery formula, tiers as data, requirement checks, what-ifs and the CLI."""
import json

import pytest

from edgestack import cli
from edgestack import plan as P


def test_battery_formula_reproduces_the_system_description_example():
    assert P.battery_hours(10_000, 10, 17) == pytest.approx(100 / 17)
    assert round(P.battery_hours(10_000, 10, 17), 1) == 5.9


def test_duty_cycle_averages_active_and_idle_draw():
    assert P.average_watts(10, 2, 0.25) == pytest.approx(0.25 * 10 + 0.75 * 2)
    assert P.average_watts(10, 2, 1.0) == 10


def test_six_tiers_with_their_figures_and_targets():
    assert P.TIER_NAMES == ("orin-nx", "agx-orin", "movidius", "qcs8275", "ethos-u55", "tflite-micro")
    from builder.targets import TARGETS

    for t in P.TIERS:
        assert t.source == P.QUOTED
        assert t.target is None or t.target in TARGETS
        assert 0 < t.idle_w < t.max_w and t.int8_tops > 0 and t.memory_mb > 0
        assert set(t.precisions) <= set(P.PRECISION_FACTOR)


def test_given_power_gives_the_battery_hours_and_energy_per_inference():
    req = P.Requirements(fps=10, battery_mah=10_000, battery_v=10)
    best = P.plan(req, (P.tier("orin-nx"),), power_w=17, precisions=("fp16",))[0]
    assert best.meets and best.source == "given"
    assert best.battery_h == pytest.approx(100 / 17)
    assert best.joules_per_inference == pytest.approx(17 / 10)


def test_what_ifs_lower_the_draw_of_the_given_baseline():
    req = P.Requirements(fps=10, battery_mah=10_000, battery_v=10)
    best = P.plan(req, (P.tier("orin-nx"),), power_w=17, precisions=("fp16",))[0]
    ifs = dict(P.what_ifs(req, best, power_w=17, clock=0.7))
    assert set(ifs) == {"GPU/NPU clock at 70%", "INT8", "INT4", f"smaller backbone ({P.SMALLER_BACKBONE_GMACS:g} GMACs)"}
    for name, p in ifs.items():
        assert p.active_w < 17 and p.battery_h > best.battery_h, name
    assert ifs["INT4"].active_w < ifs["INT8"].active_w
    assert ifs["GPU/NPU clock at 70%"].fps == pytest.approx(best.fps * 0.7)


def test_unmet_requirements_are_named_and_sorted_last():
    req = P.Requirements(fps=30, p99_ms=100, power_w=1.0)
    plans = P.plan(req)
    met = [p for p in plans if p.meets]
    assert plans[: len(met)] == met
    micro = next(p for p in plans if p.tier == "tflite-micro")
    assert not micro.meets
    assert any(w.startswith("fps") for w in micro.why_not) and any(w.startswith("memory") for w in micro.why_not)
    orin = next(p for p in plans if p.tier == "agx-orin")
    assert any(w.startswith("power") for w in orin.why_not)


def test_batch_grows_until_the_fps_is_reached():
    t = P.tier("movidius")
    one = P.plan_tier(t, P.Requirements(fps=1), "fp16")
    assert one.batch == 1
    need = one.fps * 1.2
    more = P.plan_tier(t, P.Requirements(fps=need), "fp16")
    assert more.batch > 1 and more.fps >= need and more.p99_ms > one.p99_ms


def test_measured_device_is_a_measured_plan():
    plans = P.plan(P.Requirements(fps=5), measured=(16.0, 20.0))
    mine = next(p for p in plans if p.tier == "this-device")
    assert mine.source == P.MEASURED and mine.fps == pytest.approx(16.0) and mine.joules_per_inference == 4.0


@pytest.mark.parametrize("fields, name", [({"fps": 0}, "fps"), ({"duty_cycle": 1.5}, "duty_cycle"),
                                          ({"battery_mah": 100}, "battery_mah"), ({"clock": 2}, "clock"),
                                          ({"p99_ms": -1}, "p99_ms")])
def test_bad_requirements_name_the_field(fields, name):
    with pytest.raises(P.PlanError, match=name):
        P.Requirements(**fields)


def test_unknown_tier_and_precision_are_named():
    with pytest.raises(P.PlanError, match="tier"):
        P.tier("tpu")
    with pytest.raises(P.PlanError, match="precision"):
        P.plan(P.Requirements(), precisions=("int3",))


def test_cli_battery_example(capsys):
    rc = cli.main(["plan", "--fps", "10", "--battery-mah", "10000", "--battery-volts", "10", "--power-w", "17",
                   "--tiers", "orin-nx", "--precision", "fp16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "battery 5.9 h" in out and "INT8" in out and "smaller backbone" in out and "clock at 70%" in out


def test_cli_json_and_bad_input(capsys):
    assert cli.main(["plan", "--fps", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plans"][0]["meets"] and data["what_ifs"]
    assert cli.main(["plan", "--duty-cycle", "0"]) == 2
    assert "duty_cycle" in capsys.readouterr().err


def test_measured_device_without_power_has_no_battery_figure_and_fails_a_power_budget():
    req = P.Requirements(fps=5, power_w=10, battery_mah=1000, battery_v=5)
    mine = next(p for p in P.plan(req, measured=(16.0, None)) if p.tier == "this-device")
    assert mine.battery_h is None and not mine.meets and "power not measured here" in mine.why_not
