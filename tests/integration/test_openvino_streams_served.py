"""The intel target with two OpenVINO streams per detector instance, served by a real tritonserver: a request of
several images runs them on the streams (one image each), a single image on the one-stream model with every
thread, and both give the same detections."""
from __future__ import annotations

import pytest

from builder.repository import render_repository, target_for
from builder.spec import load_spec
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests.conftest import IMAGES, SPEC
from tests.loop_support import wait_for

pytestmark = pytest.mark.integration

NAMES = ("astronaut.png", "dog.jpg", "horses.jpg")


def wait_for_counts(server: TritonServer, inferences: int) -> dict:
    """The detector's statistics once it has counted `inferences` images (Triton counts a request when it is
    released, which can be just after the response went out)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        def read() -> dict:
            return client.get_inference_statistics("detect_detector")["model_stats"][0]

        wait_for(lambda: int(read()["inference_count"]) >= inferences, 10.0, "the detector's statistics")
        return {k: int(v) for k, v in read().items() if k in ("inference_count", "execution_count")}
    finally:
        client.close()


def test_a_batch_on_the_streams_answers_as_single_images_do(tmp_path):
    spec = load_spec(SPEC).replace(target="intel")
    target = target_for(spec, detector_instances=1, intra_op_threads=2, detector_streams=2)
    repo = render_repository(spec, tmp_path / "model_repository", target)
    config = (repo / "detect_detector" / "config.pbtxt").read_text()
    assert '\\"streams\\": 2' in config and '\\"runtime\\": \\"openvino\\"' in config
    images = [(IMAGES / name).read_bytes() for name in NAMES]
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log") as server, \
            DetectionClient(server.grpc_url, "grpc") as client:
        singles = [client.detect(image) for image in images]
        before = wait_for_counts(server, inferences=len(images))
        together = client.detect_batch(images)
        after = wait_for_counts(server, inferences=before["inference_count"] + len(images))
    assert all(r.ok for r in together)
    # the request of three images ran as one execution of a batch of three: the batch went to the streams
    assert after["inference_count"] - before["inference_count"] == len(images)
    assert after["execution_count"] - before["execution_count"] == 1
    assert sum(len(r.detections) for r in singles) > 0
    for one, batch in zip(singles, together):
        assert [d.class_name for d in batch.detections] == [d.class_name for d in one.detections]
        for a, b in zip(batch.detections, one.detections):
            assert a.score == pytest.approx(b.score, abs=1e-3)
            assert a.box == pytest.approx(b.box, abs=0.5)
