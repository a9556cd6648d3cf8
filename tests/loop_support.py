"""Learning-loop test support: a sampling pipeline request helper and asyncio services run on a thread.

    BackgroundService(lambda stop: Uploader(...).run(stop))   # started at once; .stop() joins it
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from builder.repository import render_repository, target_for
from builder.spec import load_spec
from loop.pipeline_step import add_sampling
from loop.settings import SamplingSettings
from tests.conftest import SPEC


def render_sampling(out: Path, settings: SamplingSettings, spec_path: Path = SPEC) -> Path:
    """The fixture spec's single pipeline rendered into out with the sampler step added."""
    spec = load_spec(spec_path)
    repo = render_repository(spec, out, target_for(spec))
    add_sampling(repo, spec.name, settings)
    return repo


def detect_sampled(url: str, image: bytes, model: str = "detect", timeout_s: float = 60.0) -> tuple[int, bool]:
    """One image through the ensemble over gRPC: (number of detections, SAMPLED)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=object))
        result = client.infer(model, [tensor], client_timeout=timeout_s)
    return int(result.as_numpy("NUM_DETECTIONS").reshape(-1)[0]), bool(result.as_numpy("SAMPLED").reshape(-1)[0])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


class BackgroundService:
    """An async service (a coroutine taking should_stop) on its own thread and event loop."""

    def __init__(self, make: Callable[[Callable[[], bool]], Awaitable[None]]) -> None:
        self._stop = threading.Event()
        self.error: BaseException | None = None

        def main() -> None:
            try:
                asyncio.run(make(self._stop.is_set))
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self.error = exc

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "background service did not stop"
        if self.error is not None:
            raise self.error
