"""fleet.triton_metrics: Triton's Prometheus text -> one model's counters and quantiles, and the interval between
two scrapes (deltas, error rate, a counter reset after a Triton restart)."""
from fleet.triton_metrics import ModelCounters, interval_between, parse_model_counters


def exposition(success: int, failure: int, p50_us: float = 4000.0, p99_us: float = 9000.0) -> str:
    return f"""# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="detect",version="1"}} {success}
nv_inference_request_success{{model="detect_detector",version="3"}} 999
# HELP nv_inference_request_failure Number of failed inference requests
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{model="detect",reason="BACKEND",version="1"}} {failure}
nv_inference_request_failure{{model="detect",reason="REJECTED",version="1"}} 0
nv_inference_request_failure{{model="detect_detector",reason="BACKEND",version="3"}} 77
# HELP nv_inference_request_summary_us Summary of inference request duration in microseconds
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{{model="detect",version="1"}} {success + failure}
nv_inference_request_summary_us_sum{{model="detect",version="1"}} 123456
nv_inference_request_summary_us{{model="detect",version="1",quantile="0.5"}} {p50_us}
nv_inference_request_summary_us{{model="detect",version="1",quantile="0.99"}} {p99_us}
nv_inference_request_summary_us{{model="detect_detector",version="3",quantile="0.99"}} 1
"""


def test_only_the_named_model_is_counted():
    assert parse_model_counters(exposition(10, 2), "detect") == ModelCounters(10, 2, 4000.0, 9000.0)
    assert parse_model_counters(exposition(10, 2), "absent") == ModelCounters(0, 0, None, None)


def test_an_interval_is_the_difference_of_two_scrapes():
    first, second = parse_model_counters(exposition(10, 2), "detect"), parse_model_counters(exposition(58, 4), "detect")
    interval = interval_between(first, second)
    assert (interval.requests, interval.failures, interval.reset) == (50, 2, False)
    assert interval.error_rate == 4.0 and (interval.p50_ms, interval.p99_ms) == (4.0, 9.0)


def test_the_first_scrape_and_an_idle_interval_measure_nothing():
    now = parse_model_counters(exposition(10, 2), "detect")
    assert interval_between(None, now).requests == 0
    idle = interval_between(now, now)
    assert (idle.requests, idle.error_rate, idle.p50_ms, idle.p99_ms) == (0, None, None, None)


def test_a_counter_below_the_last_scrape_is_a_triton_restart():
    before = parse_model_counters(exposition(1000, 10), "detect")
    interval = interval_between(before, parse_model_counters(exposition(7, 1), "detect"))
    assert interval.reset and (interval.requests, interval.failures) == (8, 1)


def test_quantiles_from_separate_windows_never_give_p99_below_p50():
    interval = interval_between(ModelCounters(), parse_model_counters(exposition(5, 0, 6000.0, 5000.0), "detect"))
    assert interval.p99_ms == interval.p50_ms == 6.0


def test_nan_quantiles_of_an_empty_window_are_no_measurement():
    text = exposition(5, 0).replace("} 4000.0", "} NaN").replace("} 9000.0", "} NaN")
    assert parse_model_counters(text, "detect").p50_us is None
