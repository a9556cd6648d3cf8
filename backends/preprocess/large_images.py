"""Large images are decoded one at a time per preprocess model: a cross-process try-lock shared by the model's
instances (one lock file per tritonserver process and model). A large image arriving while another decodes fails
at once as busy (BusyError: UNAVAILABLE, retry) instead of taking another instance for a second or more, so the
model's other instances stay free for ordinary images and a flood of large ones cannot stall them. Nor is a large
image decoded in an execute() that Triton's batcher gave other requests too: they would wait for it.

The decode itself (a PNG has no reduced decode: 0.5 s of one core for 40 M pixels) runs in a worker thread of the
lowest CPU priority (SCHED_IDLE, else nice 19): on a device with few cores it only takes the time ordinary requests
leave, so their latency holds while large images keep arriving (BENCHMARKS.md, the flood tables).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from backends.errors import BusyError

R = TypeVar("R")
Run = Callable[[Callable[[], R]], R]


def run_here(fn: Callable[[], R]) -> R:
    """The Run of an ordinary image: fn in the calling thread."""
    return fn()


def lower_this_thread() -> str:
    """Give the calling thread the lowest CPU priority it may take; returns which ('idle', 'nice 19' or 'none')."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread only (Linux)
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        return "nice 19"
    except (AttributeError, OSError):
        return "none"


class LowPriorityWorker:
    """One thread at the lowest CPU priority; run(fn) calls fn there and waits for its result (or exception)."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def run(self, fn: Callable[[], R]) -> R:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="large-image", initializer=lower_this_thread)
        return self._pool.submit(fn).result()


class LargeImageGate:
    """gate(pixels): a context manager giving a run(fn) callable; above large_pixels it holds the model's lock (or
    raises BusyError) and run calls fn in the low-priority worker, else run calls fn here."""

    def __init__(self, large_pixels: int, lock_path: Path, worker: LowPriorityWorker | None = None):
        self.large_pixels = large_pixels
        self.lock_path = Path(lock_path)
        self.worker = worker or LowPriorityWorker()

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
    def __call__(self, pixels: int) -> Iterator[Run]:
        if pixels <= self.large_pixels:
            yield run_here
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"busy: another large image (over {self.large_pixels} pixels) is being decoded; "
                                "retry later") from None
            try:
                yield self.worker.run
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class RefuseLarge:
    def __init__(self, large_pixels: int):
        self.large_pixels = large_pixels

    @contextmanager
    def __call__(self, pixels: int) -> Iterator[Run]:
        if pixels > self.large_pixels:
            raise BusyError(f"busy: a large image (over {self.large_pixels} pixels) is decoded only when no other "
                            "request waits for its preprocess instance; retry later")
        yield run_here
