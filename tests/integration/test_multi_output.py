"""A detector with two output tensors (format boxes_scores: boxes [B, N, 4] + scores [B, N, C]), a tiny ONNX graph
made with onnx.helper (tests/boxes_scores_model.py), rendered from its spec and served by a real tritonserver:
the ensemble carries both outputs to postprocess, over gRPC and HTTP, alone and batched; the health gate's
detector call returns both and its in-process steps reproduce the ensemble; a golden set made from the
repository's recorded settings is what the server answers."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from builder.repository import render_repository, target_for
from builder.spec import load_spec
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from sidecar.golden import reference_from_repository, run_reference
from sidecar.health import PipelineSteps
from sidecar.triton_control import TritonControl
from tests import boxes_scores_model as synthetic
from tests.integration.conftest import QUEUE_DELAY_US, assert_stopped

pytestmark = pytest.mark.integration

PIPELINE = "boxes"
WIDTH, HEIGHT = 128, 64


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (value,) * 3).save(out, format="PNG")
    return out.getvalue()


WHITE, BLACK = png(255), png(0)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("multi_output")
    spec = load_spec(synthetic.write_spec(tmp, PIPELINE))
    repository = render_repository(spec, tmp / "model_repository", target_for(spec, max_queue_delay_us=QUEUE_DELAY_US))
    server = TritonServer(repository, log_path=tmp / "tritonserver.log")
    with server:
        pid = server.pid
        yield server
    assert_stopped(pid)


def answers(result) -> list[tuple[str, list[float], float]]:
    return [(d.class_name, list(d.box), d.score) for d in result.detections]


def assert_expected(found: list[tuple[str, list[float], float]], white: bool) -> None:
    expected = synthetic.expected_detections(WIDTH, HEIGHT, white)
    assert [name for name, _, _ in found] == [name for name, _, _ in expected]
    for (_, box, score), (_, want_box, want_score) in zip(found, expected):
        np.testing.assert_allclose(box, want_box, atol=1e-3)
        assert score == pytest.approx(want_score, abs=1e-4)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_both_outputs_reach_postprocess(served, protocol):
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with DetectionClient(url, protocol, model=PIPELINE) as client:
        white, black = client.detect(WHITE), client.detect(BLACK)
        assert white.source == "edge" and not white.degraded
        assert_expected(answers(white), white=True)
        assert_expected(answers(black), white=False)
        batched = client.detect_batch([BLACK, WHITE, BLACK])
        for result, is_white in zip(batched, (False, True, False)):
            assert_expected(answers(result), white=is_white)


def test_concurrent_requests_batched_by_the_detector_keep_their_own_outputs(served):
    def one(index: int):
        with DetectionClient(served.grpc_url, "grpc", model=PIPELINE) as client:
            return index % 2 == 0, client.detect(WHITE if index % 2 == 0 else BLACK)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    for is_white, result in results:
        assert_expected(answers(result), white=is_white)
    stats = httpclient.InferenceServerClient(served.http_url)
    try:
        batch_stats = stats.get_inference_statistics(f"{PIPELINE}_detector")["model_stats"][0]["batch_stats"]
    finally:
        stats.close()
    assert max(int(b["batch_size"]) for b in batch_stats) > 1, "the detector never ran a batch of requests"


def test_the_gate_reads_both_outputs_and_reproduces_the_ensemble(served):
    control = TritonControl(served.http_url, served.repository, detector_model=f"{PIPELINE}_detector",
                            ensemble_model=PIPELINE)
    steps = PipelineSteps(control)
    with DetectionClient(served.grpc_url, "grpc", model=PIPELINE) as client:
        for image, white in ((WHITE, True), (BLACK, False)):
            tensor, transform = steps.preprocess(image)
            outputs = control.infer_detector(1, tensor)
            assert [o.shape for o in outputs] == [(1, 4, 4), (1, 4, 2)]
            boxes, scores, class_ids = steps.postprocess(outputs, transform)
            in_process = [(synthetic.CLASSES[c], list(b), s) for b, s, c in zip(boxes, scores, class_ids)]
            assert_expected(in_process, white=white)
            assert_expected(answers(client.detect(image)), white=white)
    control.close()


def test_a_golden_set_from_the_repository_is_what_the_server_answers(served, tmp_path):
    (tmp_path / "white.png").write_bytes(WHITE)
    (tmp_path / "black.png").write_bytes(BLACK)
    expected = run_reference(reference_from_repository(served.repository, f"{PIPELINE}_detector"),
                             [tmp_path / "white.png", tmp_path / "black.png"])
    with DetectionClient(served.http_url, "http", model=PIPELINE) as client:
        for item, image in zip(expected, (WHITE, BLACK)):
            served_answer = answers(client.detect(image))
            assert [synthetic.CLASSES[c] for c in item.class_ids] == [name for name, _, _ in served_answer]
            np.testing.assert_allclose(item.boxes, [box for _, box, _ in served_answer], atol=1e-2)
            np.testing.assert_allclose(item.scores, [score for _, _, score in served_answer], atol=1e-4)
