"""KeepAliveHttpClient (the load generators' client) against a real tritonserver: the same answers as tritonclient's
gRPC client image by image, per-image errors in a batch, a refused request as ClientError on a connection that
keeps working, and sender_factory's senders."""
from __future__ import annotations

import pytest

from edgestack.client import DetectionClient, KeepAliveHttpClient, make_client, sender_factory
from edgestack.errors import ClientError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(fixture_images) -> list[bytes]:
    return [p.read_bytes() for p in sorted(fixture_images.iterdir()) if p.suffix in (".jpg", ".png")]


def test_same_answers_as_the_grpc_client(edge_server, images):
    with DetectionClient(edge_server.grpc_url, "grpc") as grpc, KeepAliveHttpClient(edge_server.http_url) as http:
        found = 0
        for image in images:
            mine = http.detect(image)
            assert mine == grpc.detect(image)
            found += len(mine.detections)
    assert found > 0


def test_a_bad_image_in_a_batch_fails_alone(edge_server, images):
    with make_client(edge_server, "http-keepalive") as client:
        answers = client.detect_batch([images[0], b"not an image", images[1]])
        alone = [client.detect(images[0]), client.detect(images[1])]
    assert [a.ok for a in answers] == [True, False, True]
    assert answers[1].error.startswith("image 1: ") and answers[1].detections == ()
    assert [answers[0], answers[2]] == alone


def test_a_refused_request_is_a_client_error_and_the_connection_keeps_serving(edge_server, images):
    with KeepAliveHttpClient(edge_server.http_url) as client:
        with pytest.raises(ClientError, match="image 0: empty image bytes") as info:
            client.detect_batch([b""])
        assert info.value.status == "400"
        assert client.detect(images[0]).ok
    with KeepAliveHttpClient(edge_server.http_url, model="no_such_model") as client:
        with pytest.raises(ClientError, match="no_such_model"):
            client.detect(images[0])


def test_a_server_that_is_gone_is_a_client_error(images):
    from edgestack.server import free_port

    with KeepAliveHttpClient(f"127.0.0.1:{free_port()}", timeout_s=2) as client:
        with pytest.raises(ClientError, match="HTTP request to the ensemble failed"):
            client.detect(images[0])


@pytest.mark.parametrize("protocol", ["http-keepalive", "grpc", "http"])
def test_senders_of_every_load_protocol_detect(edge_server, images, protocol):
    send = sender_factory(edge_server, protocol)()
    try:
        assert send(images[0]) == DetectionClient(edge_server.grpc_url, "grpc").detect(images[0])
    finally:
        send.close()
