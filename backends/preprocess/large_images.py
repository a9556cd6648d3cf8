"""Large images are decoded one at a time per preprocess model: a cross-process try-lock shared by the model's
instances (one lock file per tritonserver process and model). A large image arriving while another decodes fails
at once as busy (BusyError: UNAVAILABLE, retry) instead of taking another instance for a second or more, so the
model's other instances stay free for ordinary images and a flood of large ones cannot stall them. Nor is a large
image decoded in an execute() that Triton's batcher gave other requests too: they would wait for it.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from backends.errors import BusyError


class LargeImageGate:
    """gate(pixels): a context manager; above large_pixels it holds the model's lock or raises BusyError."""

    def __init__(self, large_pixels: int, lock_path: Path):
        self.large_pixels = large_pixels
        self.lock_path = Path(lock_path)

    @classmethod
    def for_model(cls, model_name: str, large_pixels: int) -> "LargeImageGate":
        """The gate every instance of model_name under this tritonserver (their parent process) shares."""
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_name)
        return cls(large_pixels, Path(tempfile.gettempdir()) / f"edgestack-large-{os.getppid()}-{safe}.lock")

    def refusing(self) -> "RefuseLarge":
        """The gate for an execute() holding several requests: a large image there would make the others wait for
        its decode, so it is refused as busy (it is decoded when it comes alone to a free instance)."""
        return RefuseLarge(self.large_pixels)

    @contextmanager
    def __call__(self, pixels: int) -> Iterator[None]:
        if pixels <= self.large_pixels:
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"busy: another large image (over {self.large_pixels} pixels) is being decoded; "
                                "retry later") from None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class RefuseLarge:
    def __init__(self, large_pixels: int):
        self.large_pixels = large_pixels

    @contextmanager
    def __call__(self, pixels: int) -> Iterator[None]:
        if pixels > self.large_pixels:
            raise BusyError(f"busy: a large image (over {self.large_pixels} pixels) is decoded only when no other "
                            "request waits for its preprocess instance; retry later")
        yield
