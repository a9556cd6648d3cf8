"""The cloud Triton, called over gRPC with a deadline; its answer comes back as Detections."""
from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from backends.common import tensors as T
from backends.common.detections import Detections, unpack
from backends.errors import CloudUnavailableError

# gRPC backs off reconnecting to an unreachable server exponentially (1 s, growing to 120 s by default) and fails
# calls fast meanwhile, so after an outage the breaker's half-open trial could fail against a cloud that is back.
# Capped at 1 s, the channel is retrying (or idle, connecting on the next call) by the time a trial is let through.
RECONNECT_BACKOFF_MS = (100, 1000)  # initial, max


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's default channel options (channel_args replaces them all) plus the short reconnect backoff."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


class CloudDetector:
    def __init__(self, url: str, model_name: str, deadline_s: float):
        self.url = url
        self.model_name = model_name
        self.deadline_s = deadline_s
        self._client = grpcclient.InferenceServerClient(url, channel_args=channel_args())
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
