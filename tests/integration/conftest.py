"""Integration fixtures: real tritonserver processes on free loopback ports, stopped by PID."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterator

import pytest

from builder.repository import PIPELINE_FILE_SUFFIX, render_repository, target_for
from builder.spec import load_spec
from edgestack.client import DetectionClient
from edgestack.server import TritonServer
from tests.conftest import SPEC

pytestmark = pytest.mark.integration

# Concurrent requests wait up to 5 ms to be batched together, so the batch tests really get batches.
QUEUE_DELAY_US = 5000


def render(tmp: Path, **router_changes) -> Path:
    spec = load_spec(SPEC)
    if router_changes:
        import dataclasses

        spec = spec.replace(router=dataclasses.replace(spec.router, **router_changes))
    return render_repository(spec, tmp / "model_repository", target_for(spec, max_queue_delay_us=QUEUE_DELAY_US))


def assert_stopped(server_pid: int) -> None:
    """The server and its Python-backend stubs (same process group) are gone."""
    try:
        os.killpg(server_pid, 0)
    except ProcessLookupError:
        return
    os.killpg(server_pid, signal.SIGKILL)
    pytest.fail(f"processes of tritonserver group {server_pid} were still running after stop()")


@pytest.fixture(scope="session")
def edge_server(tmp_path_factory) -> Iterator[TritonServer]:
    tmp = tmp_path_factory.mktemp("edge")
    server = TritonServer(render(tmp), log_path=tmp / "tritonserver.log")
    with server:
        pid = server.pid
        yield server
    assert_stopped(pid)


@pytest.fixture(params=["grpc", "http"])
def client(request, edge_server) -> Iterator[DetectionClient]:
    url = edge_server.grpc_url if request.param == "grpc" else edge_server.http_url
    with DetectionClient(url, request.param) as c:
        yield c


# The sidecar modules' shared server and agents (defined beside their helpers)
from tests.integration.sidecar_support import (fixture_sidecar_env, make_agent, sidecar_env,  # noqa: E402, F401
                                               swap_env)


def assert_each_pipeline_serves_its_variant(server: TritonServer, variants, pipeline_name) -> None:
    """Each pipeline's <name>.pipeline.json names the variant file its detector serves, and the server has it ready."""
    import json

    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        for name, variant in variants.items():
            record = json.loads((server.repository / f"{pipeline_name(name)}{PIPELINE_FILE_SUFFIX}").read_text())
            assert record["variant"]["name"] == variant.name
            assert record["variant"]["files_sha256"]["model.onnx"] == variant.options["sha256"]
            assert client.is_model_ready(f"{pipeline_name(name)}_detector")
    finally:
        client.close()


def served_detections(server: TritonServer, variants, model_of, images: list[Path], references) -> dict:
    """(variant, protocol) -> detections per image as the server answered them over gRPC and HTTP, in the
    ImageDetections of builder.optimize.evaluate (each image's size taken from its in-process reference)."""
    from builder.optimize.evaluate import ImageDetections

    answers = {}
    for name in variants:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with DetectionClient(url, protocol, model=model_of(name)) as client:
                per_image = []
                for path, reference in zip(images, references):
                    result = client.detect(path.read_bytes())
                    assert result.source == "edge" and not result.degraded
                    per_image.append(ImageDetections(
                        [d.box for d in result.detections], [d.score for d in result.detections],
                        [d.class_id for d in result.detections], reference.width, reference.height, path.name))
                answers[name, protocol] = per_image
    return answers
