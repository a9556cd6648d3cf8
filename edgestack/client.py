"""Clients of the detection ensemble: over gRPC or HTTP (tritonclient), and KeepAliveHttpClient, the same HTTP
requests on one plain keep-alive connection for load generators that share the cores with the server."""
from __future__ import annotations

import http.client
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

from backends.common import tensors as T
from edgestack.errors import ClientError

PROTOCOLS = ("grpc", "http")
LOAD_PROTOCOLS = ("http-keepalive", *PROTOCOLS)  # what a load generator may send with (make_client)
OUTPUTS = (*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS)


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    score: float
    class_id: int
    class_name: str


@dataclass(frozen=True)
class DetectionResult:
    detections: tuple[Detection, ...]
    source: str
    degraded: bool
    error: str = ""  # "image <index>: <what is wrong>" when this image of the request failed; it has no detections

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def class_names(self) -> list[str]:
        return [d.class_name for d in self.detections]

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        return {
            "source": self.source,
            "degraded": self.degraded,
            "detections": [
                {"class_id": d.class_id, "class_name": d.class_name, "score": round(d.score, 4),
                 "box": [round(v, 1) for v in d.box]}
                for d in self.detections
            ],
        }


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ClientError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    return module


def _image_input(module, images: Sequence[bytes], **binary):
    """The ensemble's IMAGE input (one row of encoded bytes per image) for tritonclient's grpc or http module."""
    tensor = module.InferInput(T.IMAGE, [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[bytes(b)] for b in images], dtype=object).reshape(len(images), 1), **binary)
    return tensor


def _check_load_protocol(protocol: str) -> None:
    if protocol not in LOAD_PROTOCOLS:
        raise ClientError(f"unknown protocol {protocol!r}; use one of {LOAD_PROTOCOLS}")


def results_from_arrays(arrays: dict[str, np.ndarray]) -> list[DetectionResult]:
    """Split the ensemble's padded batch outputs into one result per image (with its STATUS, where the server
    sent one)."""
    counts = arrays[T.NUM_DETECTIONS].reshape(-1)
    statuses = arrays.get(T.STATUS)
    statuses = [s.decode() for s in statuses.reshape(-1)] if statuses is not None else [""] * len(counts)
    results = []
    for i, k in enumerate(counts.tolist()):
        detections = tuple(
            Detection(
                box=tuple(float(v) for v in arrays[T.BOXES][i, j]),
                score=float(arrays[T.SCORES][i, j]),
                class_id=int(arrays[T.CLASS_IDS][i, j]),
                class_name=arrays[T.CLASS_NAMES][i, j].decode(),
            )
            for j in range(k)
        )
        source = arrays[T.SOURCE].reshape(-1)[i]
        degraded = bool(arrays[T.DEGRADED].reshape(-1)[i])
        results.append(DetectionResult(detections, source.decode(), degraded, statuses[i]))
    return results


class _EnsembleClient:
    """detect / detect_batch / with-statement over a subclass's infer_arrays and close."""

    def infer_arrays(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def detect(self, image: bytes) -> DetectionResult:
        """One image; ClientError when the server refuses it (its message says why)."""
        return results_from_arrays(self.infer_arrays([image]))[0]

    def detect_batch(self, images: Sequence[bytes]) -> list[DetectionResult]:
        """Several images in one request, one result each: a bad image fails only itself (its result's error says
        why, by index); ClientError when the request fails as a whole (every image bad, or the server busy)."""
        return results_from_arrays(self.infer_arrays(images))

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DetectionClient(_EnsembleClient):
    """`detect(image_bytes)` against the ensemble at url (host:port) over grpc or http."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = "detect", timeout_s: float = 30.0):
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        self._mod = _module(protocol)
        self._client = self._mod.InferenceServerClient(url, **({"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}))

    def infer_arrays(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        tensor = _image_input(self._mod, images)
        outputs = [self._mod.InferRequestedOutput(name) for name in OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._client.infer(self.model, [tensor], outputs=outputs, **kwargs)
        except InferenceServerException as exc:
            raise ClientError(exc.message() or str(exc), exc.status()) from exc
        return {name: result.as_numpy(name) for name in OUTPUTS}

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model))
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()


class KeepAliveHttpClient(_EnsembleClient):
    """DetectionClient's `detect` over one keep-alive HTTP/1.1 connection (http.client), the request built and the
    answer parsed by tritonclient.http's own functions (KServe v2 with binary tensors). One per thread.

    It exists for load generators on the server's own cores: per request it spent 0.6-1.0 ms of CPU here where
    tritonclient's gRPC client spent 1.3-1.9 ms and its HTTP client (gevent) 1.0-1.7 (benchmarks/peer_fastapi.py
    measures the FastAPI peers with the same kind of connection)."""

    def __init__(self, url: str, model: str = "detect", timeout_s: float = 30.0):
        import tritonclient.http as tc_http

        self._http = tc_http
        host, _, port = url.rpartition(":")
        self.model = model
        self._conn = http.client.HTTPConnection(host or "127.0.0.1", int(port), timeout=timeout_s)
        self._outputs = [tc_http.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS]

    def infer_arrays(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        tensor = _image_input(self._http, images, binary_data=True)
        body, header_length = self._http.InferenceServerClient.generate_request_body([tensor], outputs=self._outputs)
        headers = {"Content-Type": "application/octet-stream"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        try:
            self._conn.request("POST", f"/v2/models/{self.model}/infer", body=body, headers=headers)
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()  # the next request opens a new connection
            raise ClientError(f"HTTP request to the ensemble failed: {exc}") from exc
        if response.status != 200:
            raise ClientError(f"HTTP {response.status}: {data[:300].decode(errors='replace')}", str(response.status))
        length = response.getheader("Inference-Header-Content-Length")
        result = self._http.InferenceServerClient.parse_response_body(data, header_length=int(length) if length else None)
        return {name: result.as_numpy(name) for name in OUTPUTS}

    def close(self) -> None:
        self._conn.close()


def make_client(server: Any, protocol: str, model: str = "detect", timeout_s: float = 30.0):
    """A client of `server` (anything with http_url and grpc_url, as TritonServer) for one of LOAD_PROTOCOLS."""
    _check_load_protocol(protocol)
    if protocol == "http-keepalive":
        return KeepAliveHttpClient(server.http_url, model, timeout_s)
    return DetectionClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol, model, timeout_s)


def sender_factory(server: Any, protocol: str, model: str = "detect", timeout_s: float = 60.0):
    """For closed-loop load generators: a factory of senders, one per thread; a sender detects one image
    and has close(). An unknown protocol is refused here, before any thread or connection."""
    _check_load_protocol(protocol)

    def make():
        client = make_client(server, protocol, model, timeout_s)

        def send(data: bytes) -> DetectionResult:
            return client.detect(data)

        send.close = client.close  # type: ignore[attr-defined]
        return send

    return make
