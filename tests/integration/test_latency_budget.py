"""Latency budget against a real tritonserver."""
from __future__ import annotations

import json

import pytest

from edgestack.latency_budget import Budget, add_parser, measure_budget
from tests.conftest import IMAGES

pytestmark = pytest.mark.integration

STEPS = ("detect_preprocess", "detect_detector", "detect_postprocess", "detect_router")
REQUESTS = 10
EPS_MS = 1e-6


@pytest.fixture(scope="module")
def budget(edge_server) -> Budget:
    return measure_budget(edge_server.grpc_url, "detect", [(IMAGES / "dog.jpg").read_bytes()], REQUESTS)


def test_structure_every_step_and_time(budget):
    assert [s.model for s in budget.steps] == list(STEPS)
    assert budget.detector == "detect_detector"
    assert budget.requests == REQUESTS and budget.ensemble_requests == REQUESTS
    assert all(s.requests == REQUESTS for s in budget.steps)
    # network_ms is left out: it is a remainder that a late request release can make slightly negative.
    times = [budget.client_total_median_ms, budget.client_total_mean_ms, budget.client_total_p90_ms,
             budget.serialization_ms, budget.deserialization_ms, budget.ensemble_ms, budget.ensemble_queue_ms]
    for s in budget.steps:
        times += [s.queue_ms, s.compute_input_ms, s.compute_infer_ms, s.compute_output_ms, s.request_ms]
    assert all(t >= 0 for t in times), budget.table()


def test_parts_add_up_to_at_most_the_client_total(budget):
    assert sum(budget.components_ms.values()) == pytest.approx(budget.client_total_mean_ms)
    # The server's ensemble time can run past the client's wait only by the release after the response left,
    # which is a small part of a request (not a whole one).
    assert budget.ensemble_ms < budget.client_total_mean_ms * 1.5, budget.table()
    assert budget.network_ms > -budget.ensemble_ms / 2, budget.table()
    for s in budget.steps:
        assert s.total_ms <= budget.ensemble_ms + EPS_MS, s
        assert s.request_ms <= budget.ensemble_ms + EPS_MS, s
    # The steps run one after another inside the ensemble; they may overlap only by a step's output phase
    # (its compute_output ends once its responses are out, when the next step may already be running).
    overlap = sum(s.compute_output_ms for s in budget.steps)
    assert budget.between_steps_ms >= -overlap, budget.table()
    assert sum(s.total_ms for s in budget.steps) + budget.ensemble_queue_ms <= budget.ensemble_ms + overlap


def test_detector_compute_infer_is_the_largest_step(budget):
    detector = budget.step("detect_detector")
    others = [s for s in budget.steps if s.model != "detect_detector"]
    assert all(detector.compute_infer_ms > s.total_ms for s in others), budget.table()
    assert budget.model_alone_ms == detector.compute_infer_ms
    assert budget.overhead_ms == pytest.approx(budget.client_total_mean_ms - detector.compute_infer_ms)
    assert budget.overhead_ratio >= 1.0


def test_json_round_trip_and_table(budget):
    data = json.loads(json.dumps(budget.to_dict()))
    assert Budget.from_dict(data) == budget
    assert data["derived"]["network_grpc_frontend_ms"] == pytest.approx(budget.network_ms)
    table = budget.table()
    for name in (*STEPS, "client serialization", "network / gRPC", "ensemble queue", "client total"):
        assert name in table
    assert "warning" not in table


def test_bench_command_against_a_running_server(edge_server, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="edgestack")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "budget.json"
    args = parser.parse_args(["bench", "--url", edge_server.grpc_url, "--images", str(IMAGES), "--requests", "3",
                              "--warmup", "1", "--json", str(out)])
    assert args.func(args) == 0
    assert "detect_detector" in capsys.readouterr().out
    assert Budget.from_dict(json.loads(out.read_text())).requests == 3
