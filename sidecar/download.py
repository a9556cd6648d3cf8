"""Resumable, size-bounded, hash-verified HTTP(S) downloads over unreliable links (urllib only).

`download` writes to DEST.part, resumes with `Range: bytes=N-` after a dropped connection, never
writes beyond the expected size, verifies sha256 and renames into place atomically. Transport failures
(connection errors, timeouts, short bodies, HTTP 408/425/429/5xx) are retried with exponential backoff
and keep the .part file for a later call; content failures (a body longer or shorter than declared,
a hash mismatch, other HTTP 4xx) raise at once and delete the .part file, whose bytes are wrong.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from backends.common.files import fsync_dir, sha256_file
from sidecar.errors import DownloadError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_RETRY_STATUS = {408, 425, 429}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadProgress(Protocol):
    def __call__(self, received: int, total: int) -> None:
        """`received` bytes of `total` are in the .part file."""


class _Retry(Exception):
    """A transport failure: try again, resuming from the .part file."""


class _Refuse(Exception):
    """The server's content is wrong: stop and discard the .part file."""


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download(url: str, dest: Path, *, expected_size: int, expected_sha256: str, max_tries: int = 5,
             backoff_s: float = 0.5, timeout_s: float = 30, chunk: int = 1 << 20,
             progress: DownloadProgress | None = None) -> Path:
    """Download `url` to `dest` (atomically), resuming DEST.part; returns dest. DownloadError after
    `max_tries` failed attempts (the .part file is kept for a later resume) or on wrong content."""
    dest = Path(dest)
    expected_sha256 = expected_sha256.lower()
    if expected_size < 0 or not re.fullmatch(r"[0-9a-f]{64}", expected_sha256) or max_tries < 1 or chunk < 1:
        raise ValueError("download needs expected_size >= 0, a hex sha256, max_tries >= 1 and chunk >= 1")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    reasons: list[str] = []
    for attempt in range(1, max_tries + 1):
        have = _size(part)
        if have > expected_size:
            log.warning("%s holds %d bytes, more than the expected %d: starting over", part, have, expected_size)
            part.unlink()
            have = 0
        try:
            if have < expected_size:
                _fetch(url, part, have, expected_size, timeout_s, chunk, progress)
        except _Retry as exc:
            reasons.append(str(exc))
            log.info("download of %s, attempt %d/%d failed: %s", url, attempt, max_tries, exc)
            if attempt < max_tries:
                time.sleep(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            continue
        except _Refuse as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(f"download of {url} refused on attempt {attempt}: {exc}") from None
        part.touch()  # an empty expected file is never fetched
        digest = sha256_file(part)
        if digest != expected_sha256:
            part.unlink()
            raise DownloadError(f"download of {url}: sha256 {digest} differs from the expected {expected_sha256}; "
                                f"the {expected_size} bytes were discarded")
        os.replace(part, dest)
        fsync_dir(dest.parent)
        return dest
    raise DownloadError(f"download of {url} failed after {max_tries} attempts: {_size(part)} of {expected_size} "
                        f"bytes received, kept in {part} for a later resume; last error: {reasons[-1]}")


def _fetch(url: str, part: Path, have: int, size: int, timeout_s: float, chunk: int,
           progress: DownloadProgress | None) -> None:
    """Append the rest of the file to `part` (from byte `have`); raise _Retry or _Refuse."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "edgestack-sidecar"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:  # our resume offset is not in the server's file: start over
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for a resume at byte {have}: starting over") from None
        if exc.code in _RETRY_STATUS or exc.code >= 500:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise _Refuse(f"HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, TLS errors
        raise _Retry(f"{type(exc).__name__}: {exc}") from None
    with response:
        status = response.status
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"206 with Content-Range {response.headers.get('Content-Range')!r} "
                             f"for a resume at byte {have}: starting over")
            if match[3] != "*" and int(match[3]) != size:
                raise _Refuse(f"the server's file has {match[3]} bytes, expected {size}")
        elif status == 200:
            if have:
                log.info("%s ignored the Range request: restarting from byte 0", url)
            have = 0
        else:
            raise _Refuse(f"unexpected HTTP status {status}")
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and have + int(declared) != size:
            raise _Refuse(f"the server declares {have + int(declared)} bytes, expected {size}")
        with open(part, "r+b" if have else "wb") as out:
            out.truncate(have)
            out.seek(have)
            try:
                while have < size:
                    data = response.read(min(chunk, size - have))
                    if not data:
                        raise _Retry(f"connection closed at byte {have} of {size}")
                    out.write(data)
                    have += len(data)
                    if progress is not None:
                        progress(have, size)
                if response.read(1):
                    raise _Refuse(f"the body is longer than the expected {size} bytes")
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f"{type(exc).__name__} at byte {have} of {size}: {exc}") from None
            finally:
                out.flush()
                os.fsync(out.fileno())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
