"""Durable file operations the sidecar's crash safety rests on: after each returns, the change survives a
power cut (data and the folder entry fsynced)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename or a new file in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_synced(src: Path, dst: Path) -> None:
    """Copy src to a NEW file dst (its folders created) and fsync it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
