"""Per-image status through a real tritonserver: in one request of 8 images, a truncated one fails alone, named by
its index in STATUS; the 7 good ones get the detections they get alone. A request of only bad images fails with
INVALID_ARG naming each; the server keeps serving."""
from __future__ import annotations

import numpy as np
import pytest

from backends.common import tensors as T
from tests.integration.pipeline_support import infer_batch, same_detections

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def eight(fixture_images) -> list[bytes]:
    images = [p.read_bytes() for p in sorted(fixture_images.iterdir()) if p.suffix in (".jpg", ".png")][:8]
    images[3] = images[3][:400]  # truncated
    return images


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_bad_image_of_eight_fails_alone(edge_server, eight, protocol):
    url = edge_server.grpc_url if protocol == "grpc" else edge_server.http_url
    answers = infer_batch(url, protocol, "detect", eight)
    assert len(answers) == 8
    assert answers[3][T.STATUS].startswith("image 3: ") and len(answers[3]["scores"]) == 0
    assert "0x" not in answers[3][T.STATUS]
    found = 0
    for i, answer in enumerate(answers):
        if i == 3:
            continue
        alone = infer_batch(url, protocol, "detect", [eight[i]])[0]
        assert answer[T.STATUS] == "" and alone[T.STATUS] == ""
        assert same_detections(answer, alone), i
        found += len(answer["scores"])
    assert found > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_of_only_bad_images_fails_naming_each_and_the_server_keeps_serving(edge_server, eight, protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    from tritonclient.utils import InferenceServerException

    url = edge_server.grpc_url if protocol == "grpc" else edge_server.http_url
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(T.IMAGE, [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b""], [eight[3]]], dtype=object))
        with pytest.raises(InferenceServerException) as info:
            client.infer("detect", [tensor])
    finally:
        client.close()
    message = str(info.value)
    assert "image 0: empty image bytes" in message and "image 1: " in message
    assert infer_batch(url, protocol, "detect", [eight[0]])[0][T.STATUS] == ""


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_status_alone_can_be_asked_for(edge_server, eight, protocol):
    """Every output comes from the ensemble's last step, so asking for STATUS only runs the whole pipeline."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    client = module.InferenceServerClient(edge_server.grpc_url if protocol == "grpc" else edge_server.http_url)
    try:
        tensor = module.InferInput(T.IMAGE, [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[eight[0]], [eight[3]]], dtype=object))
        result = client.infer("detect", [tensor], outputs=[module.InferRequestedOutput(T.STATUS)])
    finally:
        client.close()
    statuses = [s.decode() for s in result.as_numpy(T.STATUS).reshape(-1)]
    assert statuses[0] == "" and statuses[1].startswith("image 1: ")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_gives_each_image_its_result_or_its_error(edge_server, eight, protocol):
    from edgestack.client import DetectionClient
    from edgestack.errors import ClientError

    url = edge_server.grpc_url if protocol == "grpc" else edge_server.http_url
    with DetectionClient(url, protocol) as client:
        results = client.detect_batch(eight[:5])
        assert [r.ok for r in results] == [True, True, True, False, True]
        assert results[3].error.startswith("image 3: ") and results[3].detections == ()
        assert results[3].to_dict() == {"error": results[3].error}
        assert [r.detections for r in results[:3]] == [client.detect(image).detections for image in eight[:3]]
        with pytest.raises(ClientError, match="image 0: "):
            client.detect(eight[3])
