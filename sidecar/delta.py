"""Binary deltas of model files against a stated base, verified by hash on both ends.

Delta file: MAGIC | u32 big-endian header length | JSON header (format, method, base_sha256, base_size,
result_sha256, result_size, payload_sha256, payload_size) | payload. `apply_delta` refuses a wrong base
before decoding anything and verifies the result's size and sha256.

Here: the framing, the public API (make_delta, apply_delta, best_delta, available_methods, read_header,
full_file_size) and the method table. Methods (bsdiff4 and zstandard are imported when needed; a missing
one is a DeltaError):
  bsdiff4          bsdiff4.diff / bsdiff4.patch.
  zstd-patch-from  the new file compressed with the base as a raw-content dictionary, long-distance
                   matching, a window covering base + new: the equivalent of `zstd --patch-from`.
  onnx-tensor      ONNX only: per-initializer differences, byte planes and a zstd-compressed container
                   (sidecar/delta_onnx.py, imported when the method is first used).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import struct
from typing import Callable, Iterable, NamedTuple

from sidecar.errors import DeltaError

log = logging.getLogger(__name__)

MAGIC = b"EDGEDLT1"
FORMAT = 1
MAX_HEADER = 64 * 1024
BSDIFF4, ZSTD_PATCH_FROM, ONNX_TENSOR = "bsdiff4", "zstd-patch-from", "onnx-tensor"
ALL = (BSDIFF4, ZSTD_PATCH_FROM, ONNX_TENSOR)
FULL = "full"  # best_delta's advice: no delta beats the zstd-compressed full file
PATCH_LEVEL = 19  # zstd levels used when making (server side); decoding speed does not depend on them
FULL_LEVEL = 19  # (onnx-tensor's level is sidecar.delta_onnx.TENSOR_LEVEL)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def require(module: str):
    """The imported module; DeltaError (the delta method cannot run) when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DeltaError(f"this delta method needs the {module!r} package, which is not installed") from exc


def raw_dict(zstd, content: bytes):
    """A zstd raw-content dictionary of `content` (None when empty)."""
    return zstd.ZstdCompressionDict(content, dict_type=zstd.DICT_TYPE_RAWCONTENT) if content else None


# ---------------------------------------------------------------- framing

def _frame(method: str, base: bytes, new: bytes, payload: bytes) -> bytes:
    header = {"format": FORMAT, "method": method, "base_sha256": sha256(base), "base_size": len(base),
              "result_sha256": sha256(new), "result_size": len(new), "payload_sha256": sha256(payload),
              "payload_size": len(payload)}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw + payload


def read_header(delta: bytes) -> dict:
    """The delta's JSON header, checked for shape (not against any base). DeltaError if malformed."""
    return _split(delta)[0]


def _split(delta: bytes) -> tuple[dict, memoryview]:
    if len(delta) < len(MAGIC) + 4 or delta[:len(MAGIC)] != MAGIC:
        raise DeltaError("not a delta file (bad magic)")
    (n,), start = struct.unpack_from(">I", delta, len(MAGIC)), len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(delta):
        raise DeltaError(f"delta header length {n} is invalid for a {len(delta)}-byte delta")
    try:
        header = json.loads(bytes(delta[start:start + n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeltaError(f"delta header is not JSON: {exc}") from exc
    fields = {"format": int, "method": str, "base_sha256": str, "base_size": int, "result_sha256": str,
              "result_size": int, "payload_sha256": str, "payload_size": int}
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in fields.items()):
        raise DeltaError(f"delta header lacks or mistypes one of {sorted(fields)}")
    if header["format"] != FORMAT:
        raise DeltaError(f"delta format {header['format']} is not supported (expected {FORMAT})")
    return header, memoryview(delta)[start + n:]


# ---------------------------------------------------------------- public API

class _Method(NamedTuple):
    encode: Callable[[bytes, bytes], bytes]  # (base, new) -> payload
    decode: Callable[[bytes, bytes, dict], bytes]  # (base, payload, header) -> result
    requires: tuple[str, ...]  # the modules it imports


def available_methods() -> tuple[str, ...]:
    """The methods whose packages import here."""
    return tuple(name for name, m in _METHODS.items() if all(importlib.util.find_spec(x) for x in m.requires))


def make_delta(base: bytes, new: bytes, method: str) -> bytes:
    """A delta that turns `base` into `new` with `method`. DeltaError if it cannot be made."""
    if method not in _METHODS:
        raise DeltaError(f"unknown delta method {method!r}; known: {', '.join(_METHODS)}")
    try:
        payload = _METHODS[method].encode(bytes(base), bytes(new))
    except DeltaError:
        raise
    except Exception as exc:  # third-party errors (bsdiff4, zstandard, onnx, numpy) mapped here
        raise DeltaError(f"{method}: cannot make a delta: {type(exc).__name__}: {exc}") from exc
    return _frame(method, base, new, payload)


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """The file the delta describes. DeltaError on a wrong base (checked before decoding), a corrupt
    delta, or a result whose size or sha256 differs from the header."""
    header, payload = _split(delta)
    method = header["method"]
    if method not in _METHODS:
        raise DeltaError(f"delta method {method!r} is unknown here")
    if len(base) != header["base_size"] or sha256(base) != header["base_sha256"]:
        raise DeltaError(f"wrong base: the delta applies to {header['base_size']} bytes with sha256 "
                         f"{header['base_sha256']}, given {len(base)} bytes with {sha256(base)}")
    if len(payload) != header["payload_size"] or sha256(payload) != header["payload_sha256"]:
        raise DeltaError(f"corrupt delta: its payload's size or sha256 differs from its header ({method})")
    try:
        result = _METHODS[method].decode(bytes(base), bytes(payload), header)
    except DeltaError:
        raise
    except Exception as exc:  # third-party errors mapped here
        raise DeltaError(f"{method}: delta does not apply: {type(exc).__name__}: {exc}") from exc
    if len(result) != header["result_size"] or sha256(result) != header["result_sha256"]:
        raise DeltaError(f"{method}: the result ({len(result)} bytes, sha256 {sha256(result)}) differs from "
                         f"the header's {header['result_size']} bytes, {header['result_sha256']}")
    return result


def full_file_size(new: bytes) -> int:
    """What shipping the whole file costs: its zstd-compressed size (its raw size without zstandard)."""
    try:
        zstd = require("zstandard")
    except DeltaError:
        log.warning("zstandard is not installed: comparing deltas with the uncompressed file")
        return len(new)
    return len(zstd.ZstdCompressor(level=FULL_LEVEL).compress(new))


def best_delta(base: bytes, new: bytes, methods: Iterable[str] = ALL, full_size: int | None = None) -> tuple[str, bytes]:
    """(method, delta) of the smallest delta that verifies when applied, or (FULL, b"") when none is
    smaller than shipping the full file: `full_size` bytes (default: its zstd-compressed size). Methods
    whose packages are not installed, or that do not apply (onnx-tensor on a non-ONNX file), are skipped."""
    methods, usable, best = tuple(methods), available_methods(), None
    if set(methods) - set(_METHODS):
        raise DeltaError(f"unknown delta method(s) {sorted(set(methods) - set(_METHODS))}")
    for method in methods:
        try:
            if method not in usable:
                raise DeltaError("its package is not installed")
            delta = make_delta(base, new, method)
            apply_delta(base, delta)
        except DeltaError as exc:
            log.info("delta method %s skipped: %s", method, exc)
            continue
        if best is None or len(delta) < len(best[1]):
            best = (method, delta)
    if best is None or len(best[1]) >= (full_file_size(new) if full_size is None else full_size):
        return FULL, b""
    return best


# ---------------------------------------------------------------- zstd --patch-from

def _patch_window_log(base_size: int, new_size: int, zstd) -> int:
    # A match may reach back over the whole base from the end of the new file.
    return min(max(10, (base_size + new_size).bit_length()), zstd.WINDOWLOG_MAX)


def _patch_encode(base: bytes, new: bytes) -> bytes:
    zstd = require("zstandard")
    sizes = dict(source_size=len(new), dict_size=len(base))
    # zstd indexes only the last 2^max(hashLog+3, chainLog+1) bytes of a dictionary: make that the whole base.
    chain_log = min(max(zstd.ZstdCompressionParameters.from_level(PATCH_LEVEL, **sizes).chain_log,
                        len(base).bit_length() - 1), zstd.CHAINLOG_MAX)
    params = zstd.ZstdCompressionParameters.from_level(
        PATCH_LEVEL, **sizes, window_log=_patch_window_log(len(base), len(new), zstd), chain_log=chain_log,
        enable_ldm=1, write_checksum=1, write_content_size=1)
    return zstd.ZstdCompressor(dict_data=raw_dict(zstd, base), compression_params=params).compress(new)


def _patch_decode(base: bytes, payload: bytes, header: dict) -> bytes:
    zstd = require("zstandard")
    size = header["result_size"]
    if zstd.frame_content_size(payload) != size:
        raise DeltaError(f"zstd frame declares {zstd.frame_content_size(payload)} bytes, header {size}")
    dctx = zstd.ZstdDecompressor(dict_data=raw_dict(zstd, base),
                                 max_window_size=1 << _patch_window_log(len(base), size, zstd))
    return dctx.decompress(payload, max_output_size=size)


# ---------------------------------------------------------------- onnx-tensor

def _onnx_tensor():
    """sidecar.delta_onnx, imported when the method is first used (it builds on this module's helpers)."""
    from sidecar import delta_onnx
    return delta_onnx


_METHODS: dict[str, _Method] = {
    BSDIFF4: _Method(lambda base, new: require("bsdiff4").diff(base, new),
                     lambda base, payload, header: require("bsdiff4").patch(base, payload), ("bsdiff4",)),
    ZSTD_PATCH_FROM: _Method(_patch_encode, _patch_decode, ("zstandard",)),
    ONNX_TENSOR: _Method(lambda base, new: _onnx_tensor().tensor_encode(base, new),
                         lambda base, payload, header: _onnx_tensor().tensor_decode(base, payload, header),
                         ("zstandard", "numpy")),
}
