"""Detectors the project never saw, served from a spec alone: a TF OD API SSD-style model (uint8 NHWC input of any
size, four outputs with normalised y1 x1 y2 x2 boxes and class ids from 1), a YOLOv5-style and an RT-DETR-style
model (tests/any_detector_models.py, graphs with symbolic output dimensions), rendered into one repository and
answered by a real tritonserver over gRPC and HTTP, alone and batched. A spec naming a wrong format for such a
dynamic output is refused by `edgestack build` with the field, what the model gave and what fits."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from builder.errors import BuilderError
from builder.repository import render_repository, target_for
from builder.spec import load_spec
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests import any_detector_models as models
from tests.integration.conftest import QUEUE_DELAY_US, assert_stopped

pytestmark = pytest.mark.integration

PIPELINES = {"ssd": "tf_od_api", "yolo5": "yolov5", "detr": "rtdetr"}
WIDTH, HEIGHT = 128, 96


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (value,) * 3).save(out, format="PNG")
    return out.getvalue()


WHITE, BLACK = png(255), png(0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("any_detector")


@pytest.fixture(scope="module")
def served(folder) -> Iterator[TritonServer]:
    repository = folder / "model_repository"
    for name, fmt in PIPELINES.items():
        spec = load_spec(models.write_spec(folder, fmt, name))
        render_repository(spec, repository, target_for(spec, max_queue_delay_us=QUEUE_DELAY_US))
    server = TritonServer(repository, log_path=folder / "tritonserver.log")
    with server:
        pid = server.pid
        yield server
    assert_stopped(pid)


def assert_expected(result, white: bool) -> None:
    expected = models.expected_detections(WIDTH, HEIGHT, white)
    assert result.source == "edge" and not result.degraded
    assert [d.class_name for d in result.detections] == [name for name, _, _ in expected]
    for detection, (_, box, score) in zip(result.detections, expected):
        np.testing.assert_allclose(list(detection.box), box, atol=1e-2)
        assert detection.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_a_spec_alone_serves_the_detector(served, pipeline, protocol):
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with DetectionClient(url, protocol, model=pipeline) as client:
        assert_expected(client.detect(WHITE), white=True)
        assert_expected(client.detect(BLACK), white=False)
        for result, white in zip(client.detect_batch([BLACK, WHITE, WHITE]), (False, True, True)):
            assert_expected(result, white=white)


def test_the_uint8_nhwc_detector_of_any_size_is_fed_its_pixels(served):
    """The SSD-style graph takes uint8 [B, H, W, 3] of any H and W: the preprocess step feeds it the spec's size
    as uint8 pixels (the graph's own normalisation), not floats."""
    from tritonclient.grpc import InferenceServerClient

    client = InferenceServerClient(served.grpc_url)
    try:
        config = client.get_model_config("ssd_detector", as_json=True)["config"]
    finally:
        client.close()
    (model_input,) = config["input"]
    assert model_input["data_type"] == "TYPE_UINT8"
    assert [int(d) for d in model_input["dims"]] == [models.HEIGHT, models.WIDTH, 3]
    outputs = {o["name"]: o for o in config["output"]}
    assert [int(d) for d in outputs["detection_boxes"]["dims"]] == [-1, -1]  # symbolic in the graph
    # one count per image ([B] in the graph) is [1] to the ensemble, reshaped to the model's []
    assert [int(d) for d in outputs["num_detections"]["dims"]] == [1]
    assert outputs["num_detections"]["reshape"].get("shape", []) == []  # protobuf JSON leaves out an empty list


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_undecodable_image_is_named_without_a_memory_address(served, protocol):
    """Pillow names its file object (`<_io.BytesIO object at 0x7fe0...>`); the client is told what is wrong."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(served.grpc_url if protocol == "grpc" else served.http_url)
    image = module.InferInput("IMAGE", [2, 1], "BYTES")
    image.set_data_from_numpy(np.array([[WHITE], [b"GIF89a but not really an image"]], dtype=object))
    try:
        result = client.infer("yolo5", [image], outputs=[module.InferRequestedOutput(n) for n in ("BOXES", "STATUS")])
        message = " ".join(v.decode() for v in result.as_numpy("STATUS").ravel())  # per-image status, if given
    except Exception as exc:  # noqa: BLE001 - the request's own error, if the status is not per image
        message = str(exc)
    finally:
        client.close()
    assert "not a decodable image" in message and "the bytes are none of these formats" in message
    assert " at 0x" not in message and "BytesIO" not in message


def test_edgestack_detect_calls_the_pipeline_its_spec_names(served, folder, tmp_path):
    (tmp_path / "white.png").write_bytes(WHITE)
    done = subprocess.run([sys.executable, "-m", "edgestack.cli", "detect", str(tmp_path / "white.png"), "--spec",
                           str(folder / "detr.yaml"), "--url", served.grpc_url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    answer = json.loads(line)
    expected = models.expected_detections(WIDTH, HEIGHT, white=True)
    assert [d["class_name"] for d in answer["detections"]] == [name for name, _, _ in expected]


def wrong_spec(tmp_path):
    """The SSD-style model's boxes [B, N, 4] (N symbolic) declared as `detections` [B, K, 6]."""
    return models.write_spec(tmp_path, "tf_od_api", "wrong", {"format": "detections", "name": "detection_boxes"})


def test_a_wrong_format_for_a_dynamic_output_is_refused_at_build_time(tmp_path):
    spec = load_spec(wrong_spec(tmp_path))
    with pytest.raises(BuilderError) as refused:
        render_repository(spec, tmp_path / "repository")
    message = str(refused.value)
    assert message.startswith("model.output.format 'detections' does not fit the model")
    assert "'detection_boxes' float32 [1, 6, 4]" in message and "needs an output [B, K, 6]" in message
    assert not (tmp_path / "repository" / "wrong").exists()


def test_edgestack_build_refuses_it_with_the_field(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgestack.cli", "build", str(wrong_spec(tmp_path)), "--out",
                           str(tmp_path / "repository")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "model.output.format 'detections' does not fit the model" in done.stderr
    assert "Traceback" not in done.stderr
