"""The cascade and the parallel ensemble end to end through a real tritonserver (gRPC and HTTP): the cascade's fast
stage answers exactly the images it is confident on, the precise stage the others, the cloud (here the same server's
single detector) what the precise stage is still unsure of; the parallel ensemble fuses its two detectors' boxes."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import pytest

from backends.common import tensors as T
from builder.repository import target_for
from builder.spec import load_spec
from edgestack.server import TritonServer, free_port
from ensembles import render_pipeline
from tests.conftest import ROOT, SPEC
from tests.integration.conftest import QUEUE_DELAY_US, assert_stopped
from tests.integration.pipeline_support import best, infer_batch, iou, same_detections

pytestmark = pytest.mark.integration

CLOUD_BELOW = 0.45  # the cascade's router: precise answers under this go to the "cloud" (this server's detect)
CLOUD_DEADLINE_MS = 120_000


@pytest.fixture(scope="module")
def pipelines_server(tmp_path_factory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("pipelines")
    repo = tmp / "model_repository"
    grpc_port = free_port()
    single = load_spec(SPEC)
    cascade = load_spec(ROOT / "specs" / "centernet_cascade.yaml")
    # the "cloud" is this same server, busy with the batch under test on 2 shared cores: a deadline it always meets,
    # so a cloud answer is never replaced by the edge's fallback (test_router_cloud tests the deadline itself)
    cascade = cascade.replace(router=dataclasses.replace(cascade.router, cloud_url=f"127.0.0.1:{grpc_port}",
                                                         cloud_model=single.name, min_confidence=CLOUD_BELOW,
                                                         deadline_ms=CLOUD_DEADLINE_MS))
    for spec in (single, cascade, load_spec(ROOT / "specs" / "centernet_parallel.yaml")):
        # one instance per step: three pipelines share this machine's cores
        render_pipeline(spec, repo, target_for(spec, max_queue_delay_us=QUEUE_DELAY_US, detector_instances=1,
                                               preprocess_instances=1))
    server = TritonServer(repo, grpc_port=grpc_port, log_path=tmp / "tritonserver.log")
    with server:
        pid = server.pid
        yield server
    assert_stopped(pid)


@pytest.fixture(scope="module")
def photos(fixture_images) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(fixture_images.iterdir()) if p.suffix in (".jpg", ".png")]


def _url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cascade_answers_each_image_from_the_right_stage(pipelines_server, photos, protocol):
    url = _url(pipelines_server, protocol)
    images = [data for _, data in photos]
    answers = infer_batch(url, protocol, "cascade", images, extra=(T.STAGE,))
    stages = {"fast": 0, "precise": 0, "cloud": 0}
    for (name, data), answer in zip(photos, answers):
        assert answer[T.STATUS] == "", name
        fast_answer = _member(url, protocol, "cascade_fast", data)
        precise_answer = _member(url, protocol, "cascade_precise", data)
        if best(fast_answer) >= 0.5:
            assert answer[T.STAGE] == "fast" and answer[T.SOURCE] == "edge", name
            assert same_detections(answer, fast_answer), name
            stages["fast"] += 1
        elif best(precise_answer) >= CLOUD_BELOW:
            assert answer[T.STAGE] == "precise" and answer[T.SOURCE] == "edge", name
            assert same_detections(answer, precise_answer), name
            stages["precise"] += 1
        else:
            assert answer[T.STAGE] == "precise" and answer[T.SOURCE] == "cloud", name
            stages["cloud"] += 1
    assert min(stages.values()) >= 1, f"every stage should answer some fixture photo: {stages}"


def _member(url: str, protocol: str, model: str, data: bytes) -> dict:
    """A cascade stage's own answer (its member ensemble outputs EDGE_* and STATUS)."""
    import numpy as np

    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(T.IMAGE, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[data]], dtype=object))
        names = (*T.EDGE_TO_FINAL, T.STATUS)
        result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(n) for n in names])
        arrays = {final: result.as_numpy(edge) for edge, final in T.EDGE_TO_FINAL.items()}
    finally:
        client.close()
    k = int(arrays[T.NUM_DETECTIONS].reshape(-1)[0])
    return {"boxes": arrays[T.BOXES][0, :k].reshape(-1, 4), "scores": arrays[T.SCORES][0, :k],
            "classes": [n.decode() for n in arrays[T.CLASS_NAMES][0, :k].tolist()]}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_parallel_keeps_every_confident_detection_of_the_spec_model(pipelines_server, photos, protocol):
    url = _url(pipelines_server, protocol)
    images = [data for _, data in photos]
    fused = infer_batch(url, protocol, "parallel", images)
    single = infer_batch(url, protocol, "detect", images)
    confident = 0
    for (name, _), answer, reference in zip(photos, fused, single):
        assert answer[T.STATUS] == "" and answer[T.SOURCE] == "edge", name
        assert list(answer["scores"]) == sorted(answer["scores"], reverse=True)
        for box, score, cls in zip(reference["boxes"], reference["scores"], reference["classes"]):
            if score < 0.5:
                continue
            confident += 1
            assert any(c == cls and iou(b, box) >= 0.5 for b, c in zip(answer["boxes"], answer["classes"])), (name, cls)
    assert confident >= 5


def test_stage_alone_can_be_asked_for(pipelines_server, photos):
    import numpy as np
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(pipelines_server.grpc_url)
    try:
        tensor = grpc.InferInput(T.IMAGE, [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[photos[0][1]], [b""]], dtype=object))
        result = client.infer("cascade", [tensor], outputs=[grpc.InferRequestedOutput(T.STAGE)])
    finally:
        client.close()
    assert [s.decode() for s in result.as_numpy(T.STAGE).reshape(-1)][1] == ""
    assert result.as_numpy(T.STAGE).reshape(-1)[0].decode() in ("fast", "precise")


@pytest.mark.parametrize("model", ["cascade", "parallel"])
def test_a_bad_image_fails_alone_in_every_pipeline(pipelines_server, photos, model):
    images = [data for _, data in photos[:8]]
    images[5] = images[5][: len(images[5]) // 3]
    url = pipelines_server.grpc_url
    answers = infer_batch(url, "grpc", model, images)
    assert answers[5][T.STATUS].startswith("image 5: ") and len(answers[5]["scores"]) == 0
    for i in (0, 1, 7):
        alone = infer_batch(url, "grpc", model, [images[i]])[0]
        assert answers[i][T.STATUS] == "" and same_detections(answers[i], alone), i
