"""Pure parts of fleet.transport and fleet.nats_server: one report message -> Report or InvalidReport, and the
binary lookup."""
import json

import pytest

from fleet.errors import TransportError
from fleet.nats_server import BINARY_ENV, find_nats_server
from fleet.protocol import InvalidReport, Report
from fleet.transport import parse_report

GOOD = {"device_id": "dev-1", "seq": 2, "model_version": "1.1.0", "install_state": "installed", "generation": 3,
        "metrics": {"requests": 4, "p50_ms": 1.0, "p99_ms": 2.0}}


def test_a_good_report_parses():
    report = parse_report("edgestack.report.dev-1", json.dumps(GOOD).encode())
    assert isinstance(report, Report) and (report.seq, report.metrics.p99_ms) == (2, 2.0)


@pytest.mark.parametrize("data, error", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "report must be a JSON object"),
    (json.dumps({**GOOD, "seq": 0}).encode(), "report.seq"),
    (json.dumps({**GOOD, "metrics": {"requests": 1, "accuracy": 7}}).encode(), "metrics.accuracy"),
    (json.dumps({**GOOD, "device_id": "dev-2"}).encode(), "not the subject's 'dev-1'"),
])
def test_a_bad_report_is_counted_against_the_subjects_device(data, error):
    report = parse_report("edgestack.report.dev-1", data)
    assert isinstance(report, InvalidReport) and report.device_id == "dev-1"
    assert error in report.error


def test_nats_server_binary_is_found_beside_python_or_named(monkeypatch, tmp_path):
    monkeypatch.delenv(BINARY_ENV, raising=False)
    assert find_nats_server().name == "nats-server"
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(TransportError, match=BINARY_ENV):
        find_nats_server()
