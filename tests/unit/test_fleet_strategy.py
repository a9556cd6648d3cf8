"""fleet.strategy: the issue's YAML, durations, defaults, and a StrategyError naming field, value and what fits
for every kind of bad input."""
from __future__ import annotations

import pytest

from fleet.errors import StrategyError
from fleet.strategy import (DEFAULT_INSTALL_FAILURES, Strategy, Trigger, load_strategy, parse_duration)
from tests.conftest import ROOT

ISSUE_YAML = """
stages:
  - name: canary
    percentage: 1
    duration_hours: 24
    rollback_trigger: {accuracy_drop: 3.0, latency_increase: 50, error_rate: 5.0}
  - name: early_access
    percentage: 10
    duration_hours: 72
    rollback_trigger: {accuracy_drop: 1.0, latency_increase: 20, error_rate: 2.0}
  - name: general_availability
    percentage: 100
    duration_hours: 0
analysis: {interval: 5m, failure_limit: 2, inconclusive: pause, min_reporting_devices: 0.9}
"""


def stages(*percentages, **first):
    return {"stages": [{"name": f"s{i}", "percentage": p, **(first if i == 0 else {})}
                       for i, p in enumerate(percentages)]}


def test_the_issue_strategy_reads_with_its_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(ISSUE_YAML)
    s = load_strategy(path)
    assert [(x.name, x.percentage, x.duration_s) for x in s.stages] == [
        ("canary", 1, 86400), ("early_access", 10, 259200), ("general_availability", 100, 0)]
    assert s.stages[0].trigger == Trigger(accuracy_drop=3.0, latency_increase=50, error_rate=5.0,
                                          install_failures=DEFAULT_INSTALL_FAILURES)
    assert s.stages[2].trigger == Trigger()  # install failures are always watched
    assert (s.analysis.interval_s, s.analysis.failure_limit, s.analysis.inconclusive) == (300, 2, "pause")
    assert s.analysis.max_device_staleness_s == 900 and s.auto_promote is True
    assert Strategy.from_dict(s.to_dict()) == s


def test_the_example_spec_is_valid():
    assert load_strategy(ROOT / "specs" / "rollout.yaml").stages[-1].percentage == 100


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("24h", 86400), ("2d", 172800), (45, 45),
                                          ("1.5h", 5400), ("250ms", 0.25), ("30", 30)])
def test_durations(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize("data,message", [
    ({}, "stages = None"),
    (stages(10, 5, 100), "stages[1].percentage = 5: must be above the previous stage's 10"),
    (stages(10, 50), "stages[1].percentage = 50: the last stage must be 100"),
    (stages(0, 100), "stages[0].percentage = 0: must be in (0, 100]"),
    (stages(10, 100, duration="soon"), "stages[0].duration = 'soon': expected seconds or a duration"),
    (stages(10, 100, duration_hours=-1), "stages[0].duration_hours = -1: must be in [0, inf]"),
    (stages(10, 100, rollback_trigger={"accuracy_drop": "3"}), "stages[0].rollback_trigger.accuracy_drop = '3'"),
    (stages(10, 100, rollback_trigger={"latency": 3}), "unknown field(s) latency"),
    (stages(10, 100, rollback_trigger={"install_failures": 101}), "install_failures = 101: must be in [0, 100]"),
    ({**stages(100), "analysis": {"inconclusive": "ignore"}}, "analysis.inconclusive = 'ignore': must be one of"),
    ({**stages(100), "analysis": {"failure_limit": 0}}, "analysis.failure_limit = 0: must be an integer >= 1"),
    ({**stages(100), "analysis": {"min_reporting_devices": 90}}, "min_reporting_devices = 90: must be in [0, 1]"),
    ({**stages(100), "analysis": {"interval": "0s"}}, "analysis.interval = '0s': must be above 0"),
    ({**stages(100), "auto_promote": "yes"}, "auto_promote = 'yes': must be true or false"),
    ({"stages": [{"name": "a", "percentage": 50}, {"name": "a", "percentage": 100}]}, "names must be unique"),
    ({"stages": [{"name": "a b", "percentage": 100}]}, "stages[0].name = 'a b'"),
])
def test_bad_strategies_name_the_field_the_value_and_what_fits(data, message):
    with pytest.raises(StrategyError) as error:
        Strategy.from_dict(data)
    assert message in str(error.value)


def test_a_file_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [{name: a, percentage: 50}]\n")
    with pytest.raises(StrategyError, match=r"bad.yaml: stages\[0\].percentage = 50"):
        load_strategy(path)
