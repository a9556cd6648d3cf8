"""Client of the detection ensemble over gRPC or HTTP (tritonclient)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

from backends.common import tensors as T
from edgestack.errors import ClientError

PROTOCOLS = ("grpc", "http")
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


class DetectionClient:
    """`detect(image_bytes)` against the ensemble at url (host:port) over grpc or http."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = "detect", timeout_s: float = 30.0):
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        self._mod = _module(protocol)
        self._client = self._mod.InferenceServerClient(url, **({"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}))

    def infer_arrays(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        tensor = self._mod.InferInput(T.IMAGE, [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[bytes(b)] for b in images], dtype=object).reshape(len(images), 1))
        outputs = [self._mod.InferRequestedOutput(name) for name in OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._client.infer(self.model, [tensor], outputs=outputs, **kwargs)
        except InferenceServerException as exc:
            raise ClientError(exc.message() or str(exc), exc.status()) from exc
        return {name: result.as_numpy(name) for name in OUTPUTS}

    def detect(self, image: bytes) -> DetectionResult:
        """One image; ClientError when the server refuses it (its message says why)."""
        return results_from_arrays(self.infer_arrays([image]))[0]

    def detect_batch(self, images: Sequence[bytes]) -> list[DetectionResult]:
        """Several images in one request, one result each: a bad image fails only itself (its result's error says
        why, by index); ClientError when the request fails as a whole (every image bad, or the server busy)."""
        return results_from_arrays(self.infer_arrays(images))

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model))
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "DetectionClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
