"""Delta bundles: files shipped as a binary delta against, or unchanged from, a base version the device has.

A file entry of the signed bundle metadata may carry a "delta" object; the entry's own sha256 and size
always describe the RESULT file:
  {"method": "unchanged", "base_sha256", "base_size"}
        no member in the tar: the device copies its base file (hashed again while copying)
  {"method": "bsdiff4" | "zstd-patch-from" | "onnx-tensor", "base_sha256", "base_size", "sha256", "size"}
        member deltas/<path> of exactly `size` bytes with `sha256`: a sidecar.delta file
The signed "base": {"model_version": semver} names the base version for people. Devices find the base by
content: the same path in one of their committed (already verified) version folders whose size and sha256
equal the stated base. A delta is applied only on top of that file, and the result's size and sha256 must
equal the signed entry, so a delta bundle can never produce a file a full bundle would not.

The bundler (plan_deltas) tries every delta method on every changed file, applies each candidate to check
it, and ships the smallest one that verifies when it is smaller than the file itself (sidecar.delta.best_delta).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from backends.common.files import sha256_file
from sidecar import delta as D
from sidecar.errors import BundleError, DeltaError

FILES_PREFIX = "files/"
DELTAS_PREFIX = "deltas/"
UNCHANGED = "unchanged"
FULL = "full"
METHODS = (UNCHANGED,) + D.ALL
_HEX = set("0123456789abcdef")
CHUNK = 1 << 20


def is_sha256(value: Any) -> bool:
    """A lowercase hex sha256 digest."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def is_size(value: Any) -> bool:
    """A byte count: an int (not a bool) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def file_digest(path: Path) -> tuple[str, int]:
    """A file's sha256 (hex) and size."""
    return sha256_file(path), Path(path).stat().st_size


def check_delta_entries(signed: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> None:
    """Shape of every entry's "delta" and of "base" (required as soon as one entry has a delta)."""
    has_delta = False
    for rel, entry in files.items():
        delta = entry.get("delta")
        if delta is None:
            continue
        has_delta = True
        if not isinstance(delta, dict) or delta.get("method") not in METHODS:
            raise BundleError(f"{rel}: delta method must be one of {', '.join(METHODS)}")
        if not is_sha256(delta.get("base_sha256")) or not is_size(delta.get("base_size")):
            raise BundleError(f"{rel}: a delta needs the base file's lowercase hex sha256 and size")
        if delta["method"] == UNCHANGED:
            if (delta["base_sha256"], delta["base_size"]) != (entry["sha256"], entry["size"]):
                raise BundleError(f"{rel}: 'unchanged' but the base and the result differ")
        elif not is_sha256(delta.get("sha256")) or not is_size(delta.get("size")):
            raise BundleError(f"{rel}: a delta needs its own lowercase hex sha256 and size")
    base = signed.get("base")
    if base is not None and (not isinstance(base, dict) or not isinstance(base.get("model_version"), str)):
        raise BundleError("base must be {\"model_version\": ...}")
    if has_delta and base is None:
        raise BundleError("the bundle has deltas but names no base version")


def delivery(files: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """How each file travels: "full", "unchanged" or the delta method."""
    return {rel: entry["delta"]["method"] if entry.get("delta") else FULL for rel, entry in files.items()}


def member_name(rel: str, entry: Mapping[str, Any]) -> str | None:
    """The tar member that carries this entry's bytes (None: none, the base file is copied)."""
    method = (entry.get("delta") or {}).get("method")
    if method == UNCHANGED:
        return None
    return (DELTAS_PREFIX if method else FILES_PREFIX) + rel


def member_size(entry: Mapping[str, Any]) -> int:
    return entry["delta"]["size"] if entry.get("delta") else entry["size"]


def member_sha256(entry: Mapping[str, Any]) -> str:
    return entry["delta"]["sha256"] if entry.get("delta") else entry["sha256"]


# --- bundler side ------------------------------------------------------------------------------------------

def plan_deltas(files: dict[str, dict[str, Any]], sources: Mapping[str, Path], base_dir: Path,
                methods: Iterable[str] = D.ALL) -> dict[str, bytes]:
    """Add a "delta" to each entry of `files` that should not travel whole; returns path -> delta bytes.

    Unchanged files (same path and bytes in base_dir) travel as "unchanged"; a changed file travels as the
    smallest delta that verifies when it is smaller than the file; new files and the rest travel whole.
    """
    base_dir, methods = Path(base_dir), tuple(methods)
    if not base_dir.is_dir():
        raise BundleError(f"base folder {base_dir} is not a folder")
    payloads: dict[str, bytes] = {}
    for rel, entry in files.items():
        base_path = base_dir / rel
        if base_path.is_symlink() or not base_path.is_file():
            continue
        base_sha, base_size = file_digest(base_path)
        if (base_sha, base_size) == (entry["sha256"], entry["size"]):
            entry["delta"] = {"method": UNCHANGED, "base_sha256": base_sha, "base_size": base_size}
            continue
        try:
            method, payload = D.best_delta(base_path.read_bytes(), sources[rel].read_bytes(), methods,
                                           full_size=entry["size"])
        except DeltaError as exc:
            raise BundleError(f"{rel}: {exc}") from exc
        if method == D.FULL:
            continue
        entry["delta"] = {"method": method, "base_sha256": base_sha, "base_size": base_size,
                          "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
        payloads[rel] = payload
    return payloads


# --- device side -------------------------------------------------------------------------------------------

def resolve_bases(signed: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]],
                  base_dirs: Sequence[Path]) -> dict[str, Path]:
    """path -> the device's base file for every delta entry, found before anything is extracted; BundleError
    naming the missing base otherwise."""
    found: dict[str, Path] = {}
    digests: dict[Path, tuple[str, int]] = {}
    for rel, entry in files.items():
        delta = entry.get("delta")
        if not delta:
            continue
        want = (delta["base_sha256"], delta["base_size"])
        for folder in base_dirs:
            path = Path(folder) / rel
            if path.is_symlink() or not path.is_file() or path.stat().st_size != want[1]:
                continue
            if path not in digests:
                digests[path] = file_digest(path)
            if digests[path] == want:
                found[rel] = path
                break
        else:
            base = (signed.get("base") or {}).get("model_version", "?")
            raise BundleError(f"{rel}: this is a delta against base {base} ({want[1]} bytes, sha256 "
                              f"{want[0][:16]}...), and no committed version on this device has that file; "
                              "install the full bundle")
    return found


def _write_new(target: Path, chunks: Iterable[bytes]) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as dst:
        for chunk in chunks:
            digest.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _read_chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            yield block


def rebuild(rel: str, entry: Mapping[str, Any], base: Path, payload: bytes | None, target: Path) -> str:
    """Write the result file of a delta entry at target (new file); returns its sha256, checked against the
    signed entry. `payload` is the verified delta member (None for "unchanged")."""
    if entry["delta"]["method"] == UNCHANGED:
        digest = _write_new(target, _read_chunks(base))
    else:
        try:
            header = D.read_header(payload)
            if header["method"] != entry["delta"]["method"]:
                raise DeltaError(f"method {header['method']!r} differs from the signed {entry['delta']['method']!r}")
            result = D.apply_delta(base.read_bytes(), payload)
        except DeltaError as exc:
            raise BundleError(f"{rel}: {exc}") from exc
        digest = _write_new(target, [result])
    if digest != entry["sha256"] or target.stat().st_size != entry["size"]:
        raise BundleError(f"{rel}: rebuilt from the base it is sha256 {digest[:16]}..., the signed result is "
                          f"{entry['sha256'][:16]}... (base changed on disk, or tampered delta)")
    return digest
