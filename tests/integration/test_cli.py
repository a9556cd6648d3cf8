"""The console script as a user runs it: build, serve (stopped by SIGINT/SIGTERM), detect --annotate."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from edgestack.server import free_port
from tests.conftest import SPEC

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "edgestack.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_every_command_explains_itself():
    for command in ([], ["build"], ["serve"], ["detect"], ["demo"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0
        assert "usage: edgestack" in result.stdout
    assert "--protocol" in run_cli("detect", "--help").stdout
    assert "--http-port" in run_cli("serve", "--help").stdout


def test_build_reports_a_bad_spec_clearly(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.read_text().replace("layout: NHWC", "layout: HWC").replace("../../shared", str(SPEC.parents[2] / "shared")))
    result = run_cli("build", str(spec), "--out", str(tmp_path / "repo"))
    assert result.returncode == 2
    assert "layout" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_build_serve_detect_and_stop(tmp_path, fixture_images, stop_signal):
    repo = tmp_path / "repo"
    built = run_cli("build", "--out", str(repo))
    assert built.returncode == 0, built.stderr
    assert (repo / "detect" / "config.pbtxt").is_file()

    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    serve = subprocess.Popen(
        [*CLI, "serve", str(repo), "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
         "--metrics-port", str(ports["metrics"]), "--log", str(tmp_path / "triton.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = serve.stdout.readline()
        assert "tritonserver ready" in line, line
        server_pid = int(line.split("(pid ")[1].split(")")[0])

        images = [str(fixture_images / "dog.jpg"), str(fixture_images / "camera.png")]
        for protocol in ("grpc", "http"):
            out = tmp_path / f"annotated_{protocol}"
            result = run_cli("detect", *images, "--protocol", protocol, "--url", f"127.0.0.1:{ports[protocol]}",
                             "--annotate", str(out))
            assert result.returncode == 0, result.stderr
            lines = [json.loads(x) for x in result.stdout.splitlines()]
            assert {d["class_name"] for d in lines[0]["detections"]} == {"dog", "bicycle", "car"}
            assert [d["class_name"] for d in lines[1]["detections"]] == ["person"]
            picture = cv2.imread(str(out / "dog.jpg"))
            assert picture.shape[:2] == (576, 768)  # drawn on the original picture

        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"\xff\xd8\xff garbage")
        result = run_cli("detect", str(bad), "--url", f"127.0.0.1:{ports['grpc']}")
        assert result.returncode == 1 and "not a decodable image" in json.loads(result.stdout)["error"]

        serve.send_signal(stop_signal)
        assert serve.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{server_pid}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{server_pid}").exists(), "tritonserver outlived `edgestack serve`"
    finally:
        if serve.poll() is None:
            serve.terminate()  # `edgestack serve` stops its tritonserver on SIGTERM
            serve.wait(timeout=60)
