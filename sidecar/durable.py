"""Durable file operations the sidecar's crash safety rests on: after each returns, the change survives a
power cut (data and the folder entry fsynced)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from backends.common.files import fsync_dir


def copy_synced(src: Path, dst: Path) -> None:
    """Copy src to a NEW file dst (its folders created) and fsync it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write tmp in the same folder, fsync, rename over path, fsync the folder: old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
