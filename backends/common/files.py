"""Files every part of the project reads: image files by suffix, the sha256 of a file, a folder's entries made
durable.

Here because backends/ may import nothing outside itself, while the builder, the sidecar, the CLI and the
load tests may all import backends/.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# the encoded image files the preprocess step decodes (Pillow), by suffix (compared in lower case)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

CHUNK_BYTES = 1 << 20


def image_files(folder: Path) -> list[Path]:
    """The image files directly in folder (by IMAGE_SUFFIXES), sorted by name; [] for a folder without any."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(folder: Path, error: type[Exception] = FileNotFoundError, what: str = "image folder") -> list[Path]:
    """image_files of a folder that must hold some; `error` (the caller's kind) when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{what} {folder} does not exist")
    found = image_files(folder)
    if not found:
        raise error(f"{what} {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def sha256_file(path: Path) -> str:
    """The sha256 of a file's content as lower-case hex, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename or a new file in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
