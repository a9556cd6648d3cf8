"""The detector's numbered version folders in the live repository: what is on disk, staging a new one,
removing one, and cleaning what an interrupted install left.

A version folder appears whole or not at all: it is copied into <model>/.staging-N and renamed to <model>/N;
it disappears by a rename to <model>/.trash-N-<pid> before it is deleted. Leftovers of either are removed by
clean_leftovers. The serving folder is never written.
"""
from __future__ import annotations

import compileall
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from backends.common.files import fsync_dir
from sidecar.durable import atomic_write, copy_synced
from sidecar.errors import DiskSpaceError

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


class VersionFolders:
    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)

    def versions(self) -> list[int]:
        """Numbered version folders on disk, ascending."""
        if not self.model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.model_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"))

    def path(self, version: int) -> Path:
        return self.model_dir / str(version)

    def stage(self, files: Mapping[str, Path], version: int, config_pbtxt: str | None) -> None:
        """Copy verified files into a new version folder N, atomically; config.pbtxt only if the model has none."""
        tmp = self.model_dir / f"{STAGING_PREFIX}{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, src in files.items():
            copy_synced(src, tmp / rel)
        # Bytecode now, so the Python stub does not write __pycache__ into a loaded version: Triton reloads a
        # model whose folder changed since its load (from disk) the next time the ensemble is loaded.
        compileall.compile_dir(str(tmp), quiet=2, workers=1)
        config = self.model_dir / "config.pbtxt"
        if config_pbtxt is not None and not config.exists():
            atomic_write(config, config_pbtxt.encode("utf-8"))
        os.rename(tmp, self.path(version))
        fsync_dir(self.model_dir)

    def remove(self, version: int) -> None:
        """Remove version folder N in one step (a rename), then delete its files; also a half-staged one."""
        shutil.rmtree(self.model_dir / f"{STAGING_PREFIX}{version}", ignore_errors=True)
        folder = self.path(version)
        if folder.is_dir():
            trash = self.model_dir / f"{TRASH_PREFIX}{version}-{os.getpid()}"
            os.rename(folder, trash)  # one step: the numbered folder is gone or whole, never half removed
            fsync_dir(self.model_dir)
            shutil.rmtree(trash, ignore_errors=True)

    def clean_leftovers(self, current: int | None, committed: Iterable[int]) -> None:
        """Remove staging and trash folders, and version folders newer than `current` that were never committed."""
        committed = set(committed)
        for path in self.model_dir.iterdir():
            if path.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
        for version in self.versions():
            if current is not None and version > current and version not in committed:
                self.remove(version)  # staged by an install that never committed


def check_free_space(folders: Iterable[Path], needed: int, min_free_bytes: int) -> None:
    """`needed` bytes on the filesystem of each folder (counted once per folder, so twice on a shared one),
    with min_free_bytes left over; DiskSpaceError otherwise."""
    usage: dict[int, list] = {}
    for folder in folders:
        entry = usage.setdefault(os.stat(folder).st_dev, [folder, 0])
        entry[1] += needed
    for folder, need in usage.values():
        free = shutil.disk_usage(folder).free
        if free - need < min_free_bytes:
            raise DiskSpaceError(f"installing needs {need} bytes under {folder}: {free} free, and "
                                 f"{min_free_bytes} must stay free")
