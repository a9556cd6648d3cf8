"""The device's durable spool of samples: one file per sample in a folder, bounded in bytes, rate limited.

A sample is an encoded image with its metadata (sample.Sample). put() writes it to a temporary file, fsyncs it and
renames it into place, so after a crash or restart the spool holds whole samples only (leftover temporaries are
removed at open). Files are named <time_ns>-<sha256[:16]>.sample and read oldest first. The byte bound counts the
files on disk: a sample that would take the spool over max_bytes is refused (counted as dropped_full) - the spool
keeps what it has rather than losing samples it already promised to deliver. A token bucket (rate_per_s, burst)
refuses samples that come faster (dropped_rate). The uploader (another thread or process) removes a sample once
the cloud stored it; the writer's byte count is re-read from the folder whenever the bound is near.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from backends.common.files import fsync_dir
from loop.errors import SpoolError

MAGIC = b"ESMP1\n"
SUFFIX = ".sample"
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Sample:
    """One kept image: its encoded bytes and what the device knew (predictions, uncertainty, model, device, time)."""
    image: bytes
    meta: dict[str, Any] = field(default_factory=dict)  # sample_id, device_id, model_version, time, predictions...

    def encode(self) -> bytes:
        header = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + _LEN.pack(len(header)) + header + self.image

    @classmethod
    def decode(cls, data: bytes, what: str = "sample") -> "Sample":
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LEN.size:
            raise SpoolError(f"{what}: not a sample (bad magic)")
        (size,) = _LEN.unpack_from(data, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        if start + size > len(data):
            raise SpoolError(f"{what}: header of {size} bytes runs past the end ({len(data)} bytes)")
        try:
            meta = json.loads(data[start:start + size])
        except ValueError as exc:
            raise SpoolError(f"{what}: header is not JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise SpoolError(f"{what}: header must be a JSON object")
        return cls(image=data[start + size:], meta=meta)


class TokenBucket:
    """rate_per_s tokens a second, at most burst; take() is True when a token was there."""

    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self.tokens, self.stamp = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


class Spool:
    """A folder of samples. Safe for one writer and any number of readers/removers (other processes too)."""

    def __init__(self, folder: Path | str, max_bytes: int, *, rate_per_s: float = 1e9, burst: int = 1_000_000,
                 clock=time.monotonic) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp-*"):  # a write interrupted by a crash
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool folder {self.folder} cannot be used: {exc}") from None
        self.bucket = TokenBucket(rate_per_s, burst, clock)
        self.counts = {"spooled": 0, "dropped_full": 0, "dropped_rate": 0}
        self._bytes = self.disk_bytes()
        self._lock = threading.Lock()

    def disk_bytes(self) -> int:
        """What the spool's samples take on disk now (the folder read again)."""
        total = 0
        for path in self.paths():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # removed by the uploader meanwhile
                pass
        return total

    def admit(self) -> bool:
        """The rate limit: True when a sample may be taken now (cheap: the sampler asks before encoding)."""
        if self.bucket.take():
            return True
        self.counts["dropped_rate"] += 1
        return False

    def offer(self, sample: Sample) -> Path | None:
        """admit() then put(): None when either refuses."""
        return self.put(sample) if self.admit() else None

    def put(self, sample: Sample) -> Path | None:
        """Write the sample durably; None (and counted) when the byte bound refuses it."""
        data = sample.encode()
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                self._bytes = self.disk_bytes()  # the uploader may have removed some
                if self._bytes + len(data) > self.max_bytes:
                    self.counts["dropped_full"] += 1
                    return None
            digest = str(sample.meta.get("sample_id", ""))[:16] or "nohash"
            name = f"{time.time_ns():020d}-{digest}{SUFFIX}"
            tmp = self.folder / f".tmp-{name}.part"  # not *.sample: readers never see a partial sample
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.folder / name)
                fsync_dir(self.folder)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise SpoolError(f"cannot write sample to {self.folder}: {exc}") from None
            self._bytes += len(data)
            self.counts["spooled"] += 1
        return self.folder / name

    def paths(self) -> list[Path]:
        """The spooled samples, oldest first."""
        return sorted(p for p in self.folder.glob("*" + SUFFIX) if not p.name.startswith("."))

    def __len__(self) -> int:
        return len(self.paths())

    def read(self, path: Path) -> Sample:
        return Sample.decode(Path(path).read_bytes(), str(path))

    def items(self) -> Iterator[tuple[Path, Sample]]:
        """(path, sample) oldest first; a file removed meanwhile is skipped, a malformed one is moved aside to
        <name>.bad (it would block the queue forever)."""
        for path in self.paths():
            try:
                yield path, self.read(path)
            except FileNotFoundError:
                continue
            except SpoolError:
                path.rename(path.with_suffix(".bad"))

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._bytes = max(0, self._bytes - size)
