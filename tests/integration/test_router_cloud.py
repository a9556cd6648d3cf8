"""Edge/cloud routing with a second real tritonserver on loopback playing the cloud."""
from __future__ import annotations

import time

import pytest
import tritonclient.http as httpclient

from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests.integration.conftest import assert_stopped, render
from tests.loop_support import wait_for

pytestmark = pytest.mark.integration

DEADLINE_MS = 1500
COOLDOWN_S = 2.0
# Long enough for gRPC's default reconnect backoff to grow past the cooldown: the cloud must still be used again
# right after its first half-open trial (backends/router/cloud.py caps the backoff).
OUTAGE_S = 8.0
MIN_CONFIDENCE = 0.6  # grace_hopper.jpg (person 0.74) stays on the edge; flower.jpg (nothing) goes to the cloud


def cloud_inferences(server: TritonServer) -> int:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return int(client.get_inference_statistics("detect")["model_stats"][0]["inference_stats"]["success"]["count"])
    finally:
        client.close()


@pytest.fixture(scope="module")
def cloud_repo(tmp_path_factory):
    return render(tmp_path_factory.mktemp("cloud"))


def test_low_confidence_goes_to_cloud_and_degrades_when_cloud_is_down(tmp_path_factory, cloud_repo, fixture_images):
    tmp = tmp_path_factory.mktemp("edge_with_cloud")
    cloud = TritonServer(cloud_repo, log_path=tmp / "cloud.log").start()
    cloud_pid, cloud_grpc_port = cloud.pid, cloud.grpc_port
    edge_repo = render(tmp, cloud_url=cloud.grpc_url, min_confidence=MIN_CONFIDENCE, deadline_ms=DEADLINE_MS,
                       failure_threshold=1, cooldown_s=COOLDOWN_S)
    flower = (fixture_images / "flower.jpg").read_bytes()
    person = (fixture_images / "grace_hopper.jpg").read_bytes()
    try:
        with TritonServer(edge_repo, log_path=tmp / "edge.log") as edge, DetectionClient(edge.grpc_url, "grpc") as client:
            confident = client.detect(person)
            assert (confident.source, confident.degraded, confident.class_names) == ("edge", False, ["person"])

            before = cloud_inferences(cloud)
            low = client.detect(flower)
            assert (low.source, low.degraded) == ("cloud", False)
            # Triton counts a request when it is released, which can be just after its response went out.
            wait_for(lambda: cloud_inferences(cloud) == before + 1, 10.0, "the cloud server to count the request")

            cloud.stop()
            assert_stopped(cloud_pid)
            started = time.monotonic()
            down = client.detect(flower)
            assert (down.source, down.degraded) == ("edge", True)
            assert time.monotonic() - started < DEADLINE_MS / 1000 + 1.0

            started = time.monotonic()
            open_circuit = client.detect(flower)  # breaker open: the dead cloud is not called at all
            assert (open_circuit.source, open_circuit.degraded) == ("edge", True)
            assert time.monotonic() - started < DEADLINE_MS / 1000

            time.sleep(OUTAGE_S)
            cloud = TritonServer(cloud_repo, grpc_port=cloud_grpc_port, log_path=tmp / "cloud2.log").start()
            # The cooldown, then up to the capped backoff (1 s, +20% jitter) for the channel to reconnect, and slack
            # for a loaded machine; gRPC's uncapped backoff would be several seconds further out by now.
            time.sleep(COOLDOWN_S + 1.0)
            back = client.detect(flower)
            assert (back.source, back.degraded) == ("cloud", False)
            wait_for(lambda: cloud_inferences(cloud) == 1, 10.0, "the restarted cloud to count the request")
    finally:
        cloud.stop()


def test_slow_cloud_is_cut_off_at_the_deadline(tmp_path_factory, cloud_repo, fixture_images):
    """A 5 ms deadline is shorter than the cloud's inference: the edge answer comes back, degraded, quickly."""
    tmp = tmp_path_factory.mktemp("edge_slow_cloud")
    with TritonServer(cloud_repo, log_path=tmp / "cloud.log") as cloud:
        edge_repo = render(tmp, cloud_url=cloud.grpc_url, min_confidence=0.99, deadline_ms=5, failure_threshold=5)
        with TritonServer(edge_repo, log_path=tmp / "edge.log") as edge, DetectionClient(edge.http_url, "http") as client:
            data = (fixture_images / "dog.jpg").read_bytes()
            started = time.monotonic()
            result = client.detect(data)
            elapsed = time.monotonic() - started
    assert (result.source, result.degraded) == ("edge", True)
    assert set(result.class_names) == {"dog", "bicycle", "car"}
    assert elapsed < 2.0
    assert "cloud failed" in (tmp / "edge.log").read_text()
