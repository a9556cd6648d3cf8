"""The cloud Triton, called over gRPC with a deadline; its answer comes back as Detections."""
from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from backends.common import tensors as T
from backends.common.detections import Detections, unpack
from backends.errors import CloudUnavailableError


class CloudDetector:
    def __init__(self, url: str, model_name: str, deadline_s: float):
        self.url = url
        self.model_name = model_name
        self.deadline_s = deadline_s
        self._client = grpcclient.InferenceServerClient(url)
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in T.DETECTION_OUTPUTS]

    def __call__(self, image: bytes) -> Detections:
        tensor = grpcclient.InferInput(T.IMAGE, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=object))
        try:
            result = self._client.infer(self.model_name, [tensor], outputs=self._outputs, client_timeout=self.deadline_s)
        except InferenceServerException as exc:
            raise CloudUnavailableError(f"{self.url}: {exc.message()}") from exc
        arrays = [result.as_numpy(name) for name in T.DETECTION_OUTPUTS]
        return unpack(*arrays)[0]

    def close(self) -> None:
        self._client.close()
