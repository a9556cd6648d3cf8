"""Bad input gets a clear per-request error, and the server keeps serving the next request."""
from __future__ import annotations

import io
import os
import queue

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from edgestack.errors import ClientError

pytestmark = pytest.mark.integration


def png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def bad_images(fixture_images) -> dict[str, tuple[bytes, str]]:
    jpeg = (fixture_images / "dog.jpg").read_bytes()
    return {
        "empty": (b"", "empty image bytes"),
        "random": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a decodable image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "one_pixel": (png(1, 1), "smaller than the minimum side"),
        "ten_thousand_square": (png(10000, 10000), "exceeds the maximum side"),
        "over_pixel_limit": (png(8000, 6000), "over the limit of 40000000"),
    }


CASES = ["empty", "random", "truncated_jpeg", "one_pixel", "ten_thousand_square", "over_pixel_limit"]


@pytest.fixture(scope="module")
def bad(fixture_images):
    return bad_images(fixture_images)


@pytest.mark.parametrize("case", CASES)
def test_bad_image_gets_invalid_arg_and_server_keeps_serving(client, fixture_images, bad, case):
    data, expected = bad[case]
    with pytest.raises(ClientError) as info:
        client.detect(data)
    assert expected in str(info.value)
    assert "INVALID_ARG" in (info.value.status or "") or "400" in (info.value.status or ""), info.value.status
    result = client.detect((fixture_images / "horses.jpg").read_bytes())
    assert set(result.class_names) == {"horse"}


def test_wrong_dtype_and_shape_are_rejected(edge_server, fixture_images):
    client = grpcclient.InferenceServerClient(edge_server.grpc_url)
    try:
        wrong_dtype = grpcclient.InferInput("IMAGE", [1, 1], "INT32")
        wrong_dtype.set_data_from_numpy(np.zeros((1, 1), dtype=np.int32))
        with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|dtype"):
            client.infer("detect", [wrong_dtype])
        wrong_shape = grpcclient.InferInput("IMAGE", [1, 2], "BYTES")
        wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
        with pytest.raises(InferenceServerException, match="(?i)shape"):
            client.infer("detect", [wrong_shape])
        too_big_batch = grpcclient.InferInput("IMAGE", [9, 1], "BYTES")
        too_big_batch.set_data_from_numpy(np.array([[b"a"]] * 9, dtype=object))
        with pytest.raises(InferenceServerException, match="(?i)batch"):
            client.infer("detect", [too_big_batch])
        good = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        good.set_data_from_numpy(np.array([[(fixture_images / "dog.jpg").read_bytes()]], dtype=object))
        assert client.infer("detect", [good]).as_numpy("NUM_DETECTIONS")[0, 0] == 3
    finally:
        client.close()


def test_http_raw_request_with_non_image_string(edge_server):
    client = httpclient.InferenceServerClient(edge_server.http_url)
    try:
        tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([["not an image"]], dtype=object))
        with pytest.raises(InferenceServerException, match="not a decodable image"):
            client.infer("detect", [tensor])
    finally:
        client.close()


def test_one_bad_image_in_a_batch_fails_only_its_request(edge_server, fixture_images, bad):
    """Concurrent requests batched together by Triton: the bad one errors, the good ones get detections."""
    good = [(fixture_images / n).read_bytes() for n in ("dog.jpg", "horses.jpg", "astronaut.png")]
    payloads = [good[0], bad["truncated_jpeg"][0], good[1], good[2]]
    client = grpcclient.InferenceServerClient(edge_server.grpc_url)
    stats_before = client.get_inference_statistics("detect_preprocess", as_json=True)["model_stats"][0]
    answers: "queue.Queue[tuple[int, object, object]]" = queue.Queue()
    try:
        for index, payload in enumerate(payloads):
            tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[payload]], dtype=object))
            client.async_infer("detect", [tensor], callback=lambda result, error, i=index: answers.put((i, result, error)))
        collected = {}
        for _ in payloads:
            index, result, error = answers.get(timeout=60)
            collected[index] = (result, error)
        stats_after = client.get_inference_statistics("detect_preprocess", as_json=True)["model_stats"][0]
    finally:
        client.close()
    assert collected[1][1] is not None and "truncated" in collected[1][1].message()
    expected = {0: {b"dog", b"bicycle", b"car"}, 2: {b"horse"}, 3: {b"person"}}
    for index, names in expected.items():
        result, error = collected[index]
        assert error is None, error
        count = int(result.as_numpy("NUM_DETECTIONS")[0, 0])
        assert set(result.as_numpy("CLASS_NAMES")[0, :count].tolist()) == names
    executions = int(stats_after["execution_count"]) - int(stats_before["execution_count"])
    assert executions < len(payloads), "the four requests were not batched together"


def test_server_is_healthy_after_bad_input(edge_server, bad, fixture_images):
    client = grpcclient.InferenceServerClient(edge_server.grpc_url)
    try:
        for data, _ in bad.values():
            tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[data]], dtype=object))
            with pytest.raises(InferenceServerException):
                client.infer("detect", [tensor])
        assert client.is_server_live() and client.is_server_ready()
        for model in ("detect", "detect_preprocess", "detect_detector", "detect_postprocess", "detect_router"):
            assert client.is_model_ready(model), model
        assert os.path.exists(f"/proc/{edge_server.pid}")
    finally:
        client.close()


def test_decoded_pixels_are_not_allocated_for_a_decompression_bomb(bad):
    """The over-limit PNG is tiny on the wire: the limit must come from the header, not the pixels."""
    data, _ = bad["over_pixel_limit"]
    assert len(data) < 200_000
    assert cv2.imdecode(np.frombuffer(data[:64], np.uint8), cv2.IMREAD_UNCHANGED) is None
