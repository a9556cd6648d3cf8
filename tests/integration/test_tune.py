"""Integration (slow): a tiny `edgestack tune` search against real tritonservers (ONNX Runtime and OpenVINO
detectors), and the tuned repository served."""
import json

import pytest

from edgestack import cli
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests.conftest import IMAGES, SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_search_writes_the_chosen_repository_and_it_serves(tmp_path, capsys):
    out, report = tmp_path / "tuned", tmp_path / "report"
    rc = cli.main(["tune", str(SPEC), "--images", str(IMAGES), "--targets", "cpu,intel", "--detector-instances", "1",
                   "--intra-op-threads", "2", "--detector-streams", "1", "--spinning", "off", "--queue-delay-us", "0",
                   "--concurrency", "1,2",
                   "--seconds", "1", "--warmup", "0.2",
                   "--objective", "latency", "--out", str(out), "--report", str(report)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads((report / "tune_report.json").read_text())
    assert [(t["candidate"]["target"], t["candidate"]["intra_op_threads"]) for t in data["trials"]] == [
        ("cpu", 2), ("intel", 2)]
    for t in data["trials"]:
        assert t["error"] == "" and [lv["concurrency"] for lv in t["levels"]] == [1, 2]
        assert all(lv["requests"] > 0 and lv["errors"] == 0 for lv in t["levels"])
    chosen = data["chosen"]["candidate"]
    best = min(data["trials"], key=lambda t: t["levels"][0]["p99_ms"])
    assert chosen == best["candidate"]
    assert "**chosen**" in (report / "tune_report.md").read_text() and "choice (latency)" in printed

    config = (out / "detect_detector" / "config.pbtxt").read_text()
    assert f'count: {chosen["detector_instances"]}' in config
    assert f'\\"intra_op_threads\\": {chosen["intra_op_threads"]}' in config
    runtime = {"cpu": "onnxruntime", "intel": "openvino"}[chosen["target"]]
    assert f'\\"runtime\\": \\"{runtime}\\"' in config
    with TritonServer(out, log_path=tmp_path / "tritonserver.log") as server:
        with DetectionClient(server.grpc_url, "grpc", "detect") as client:
            image = sorted(IMAGES.glob("*.jpg"))[0].read_bytes()
            assert client.detect(image).source
