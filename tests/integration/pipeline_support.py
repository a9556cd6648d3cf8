"""Helpers of the pipeline and batch-status integration tests: one raw batched request, over gRPC or HTTP, with
every output the pipeline names, as numpy arrays per image."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from backends.common import tensors as T

OUTPUTS = (*T.DETECTION_OUTPUTS, T.SOURCE, T.DEGRADED, T.STATUS)


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def infer_batch(url: str, protocol: str, model: str, images: Sequence[bytes], extra: Sequence[str] = (),
                max_batch: int = 8) -> list[dict]:
    """Requests of up to max_batch images each; per image {output: value}: detections as arrays, strings decoded."""
    answers = []
    for start in range(0, len(images), max_batch):
        answers += _infer_one(url, protocol, model, images[start:start + max_batch], extra)
    return answers


def _infer_one(url: str, protocol: str, model: str, images: Sequence[bytes], extra: Sequence[str]) -> list[dict]:
    module = _module(protocol)
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput(T.IMAGE, [len(images), 1], "BYTES")
        tensor.set_data_from_numpy(np.array(list(images), dtype=object).reshape(-1, 1))
        names = (*OUTPUTS, *extra)
        result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(n) for n in names])
        arrays = {name: result.as_numpy(name) for name in names}
    finally:
        client.close()
    return per_image(arrays, len(images))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def per_image(arrays: dict, count: int) -> list[dict]:
    answers = []
    for i in range(count):
        k = int(arrays[T.NUM_DETECTIONS].reshape(-1)[i])
        answer = {
            "boxes": arrays[T.BOXES][i, :k].reshape(-1, 4),
            "scores": arrays[T.SCORES][i, :k],
            "classes": [_text(n) for n in arrays[T.CLASS_NAMES][i, :k].tolist()],
        }
        for name in arrays:
            if name not in (T.BOXES, T.SCORES, T.CLASS_NAMES, T.CLASS_IDS, T.NUM_DETECTIONS):
                answer[name] = _text(arrays[name].reshape(-1)[i]) if arrays[name].dtype == object else arrays[name].reshape(-1)[i]
        answers.append(answer)
    return answers


def best(answer: dict) -> float:
    return float(answer["scores"].max()) if len(answer["scores"]) else 0.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def same_detections(a: dict, b: dict) -> bool:
    return (a["classes"] == b["classes"] and np.allclose(a["scores"], b["scores"], atol=1e-5)
            and np.allclose(a["boxes"], b["boxes"], atol=1e-3))
