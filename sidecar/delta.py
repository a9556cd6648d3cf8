"""Binary deltas of model files against a stated base, verified by hash on both ends.

Delta file: MAGIC | u32 big-endian header length | JSON header (format, method, base_sha256, base_size,
result_sha256, result_size, payload_sha256, payload_size) | payload. `apply_delta` refuses a wrong base
before decoding anything and verifies the result's size and sha256.

Methods (bsdiff4 and zstandard are imported when needed; a missing one is a DeltaError):
  bsdiff4          bsdiff4.diff / bsdiff4.patch.
  zstd-patch-from  the new file compressed with the base as a raw-content dictionary, long-distance
                   matching, a window covering base + new: the equivalent of `zstd --patch-from`.
  onnx-tensor      ONNX only. Per initializer with raw_data: unchanged -> reference to the base tensor
                   by name; same name, dtype and shape -> the wrapping integer difference of the bit
                   patterns per element, zigzag-coded, split into byte planes; else stored whole (byte
                   planes). The model without that tensor data is stored whole; all zstd-compressed with
                   the base's own structure as dictionary. Mode "proto" rebuilds the ModelProto with
                   onnx's deterministic serialization; mode "layout" (when that is not byte-identical)
                   keeps the file's own bytes outside the tensor data and where the data goes back.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import struct
from typing import Callable, Iterable, NamedTuple

import numpy as np

from sidecar.errors import DeltaError

log = logging.getLogger(__name__)

MAGIC = b"EDGEDLT1"
FORMAT = 1
MAX_HEADER = 64 * 1024
BSDIFF4, ZSTD_PATCH_FROM, ONNX_TENSOR = "bsdiff4", "zstd-patch-from", "onnx-tensor"
ALL = (BSDIFF4, ZSTD_PATCH_FROM, ONNX_TENSOR)
FULL = "full"  # best_delta's advice: no delta beats the zstd-compressed full file
PATCH_LEVEL = 19  # zstd levels used when making (server side); decoding speed does not depend on them
TENSOR_LEVEL = 19
FULL_LEVEL = 19

_CONTAINER_MAGIC = b"OTD1"
# Element width in bytes of ONNX TensorProto data types stored as raw_data (little-endian).
_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 4, 15: 8, 16: 2,
          17: 1, 18: 1, 19: 1, 20: 1}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DeltaError(f"this delta method needs the {module!r} package, which is not installed") from exc


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
        zstd = _require("zstandard")
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


def _raw_dict(zstd, content: bytes):
    return zstd.ZstdCompressionDict(content, dict_type=zstd.DICT_TYPE_RAWCONTENT) if content else None


def _patch_encode(base: bytes, new: bytes) -> bytes:
    zstd = _require("zstandard")
    sizes = dict(source_size=len(new), dict_size=len(base))
    # zstd indexes only the last 2^max(hashLog+3, chainLog+1) bytes of a dictionary: make that the whole base.
    chain_log = min(max(zstd.ZstdCompressionParameters.from_level(PATCH_LEVEL, **sizes).chain_log,
                        len(base).bit_length() - 1), zstd.CHAINLOG_MAX)
    params = zstd.ZstdCompressionParameters.from_level(
        PATCH_LEVEL, **sizes, window_log=_patch_window_log(len(base), len(new), zstd), chain_log=chain_log,
        enable_ldm=1, write_checksum=1, write_content_size=1)
    return zstd.ZstdCompressor(dict_data=_raw_dict(zstd, base), compression_params=params).compress(new)


def _patch_decode(base: bytes, payload: bytes, header: dict) -> bytes:
    zstd = _require("zstandard")
    size = header["result_size"]
    if zstd.frame_content_size(payload) != size:
        raise DeltaError(f"zstd frame declares {zstd.frame_content_size(payload)} bytes, header {size}")
    dctx = zstd.ZstdDecompressor(dict_data=_raw_dict(zstd, base),
                                 max_window_size=1 << _patch_window_log(len(base), size, zstd))
    return dctx.decompress(payload, max_output_size=size)


# ---------------------------------------------------------------- onnx-tensor

class _Tensor(NamedTuple):
    name: str
    dtype: int
    dims: tuple
    start: int  # raw_data's byte span in the file; -1 when the tensor has no raw_data
    end: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, pos: int, end: int):
    """(field number, wire type, varint value or None, value start, value end) of a protobuf message."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            value, stop = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            stop = pos + length
        elif wire in (1, 5):
            stop = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if stop > end:
            raise ValueError("protobuf field runs past its message")
        yield number, wire, value, pos, stop
        pos = stop


def _initializers(buf: bytes) -> list[_Tensor]:
    """The graph initializers of a serialized ModelProto (graph=7, initializer=5; TensorProto dims=1,
    data_type=2, name=8, raw_data=9), with the byte span of each one's raw_data."""
    out = []
    for number, wire, _, start, stop in _fields(buf, 0, len(buf)):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, _, g_start, g_stop in _fields(buf, start, stop):
            if g_number != 5 or g_wire != 2:
                continue
            name, dtype, dims, span = "", 0, [], (-1, -1)
            for t_number, t_wire, value, t_start, t_stop in _fields(buf, g_start, g_stop):
                if t_number == 1:  # compared for equality only: a packed run stays as its bytes
                    dims.append(value if t_wire == 0 else buf[t_start:t_stop])
                elif t_number == 2 and t_wire == 0:
                    dtype = value
                elif t_number == 8 and t_wire == 2:
                    name = buf[t_start:t_stop].decode("utf-8", "replace")
                elif t_number == 9 and t_wire == 2:
                    span = (t_start, t_stop)
            out.append(_Tensor(name, dtype, tuple(dims), *span))
    return out


def _cut(buf: bytes, tensors: Iterable[_Tensor]) -> tuple[bytes, list[int]]:
    """The bytes outside the tensors' raw_data, and where each tensor's data goes back in them."""
    pieces, ats, at, pos = [], [], 0, 0
    for t in tensors:
        pieces.append(buf[pos:t.start])
        at += t.start - pos
        ats.append(at)
        pos = t.end
    return b"".join(pieces) + buf[pos:], ats


def _planes(data: bytes, width: int) -> bytes:
    return data if width == 1 else np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def _unplanes(data: bytes, width: int) -> bytes:
    return data if width == 1 else np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _sub_encode(new: bytes, old: bytes, width: int) -> bytes:
    kind = np.dtype(f"<u{width}")
    signed = (np.frombuffer(new, kind) - np.frombuffer(old, kind)).view(f"<i{width}")
    zigzag = ((signed << 1) ^ (signed >> (8 * width - 1))).view(kind)
    return _planes(zigzag.tobytes(), width)


def _sub_decode(blob: bytes, old: bytes, width: int) -> bytes:
    kind = np.dtype(f"<u{width}")
    zigzag = np.frombuffer(_unplanes(blob, width), kind)
    diff = (zigzag >> 1) ^ np.negative(zigzag & 1)
    return (np.frombuffer(old, kind) + diff).tobytes()


def _base_tensors(base: bytes) -> dict[str, _Tensor]:
    by_name: dict[str, _Tensor] = {}
    for t in _initializers(base):
        if t.start >= 0:
            by_name.setdefault(t.name, t)
    return by_name


def _tensor_pack(base: bytes, new: bytes) -> bytes:
    """The uncompressed onnx-tensor container; proto mode if it reproduces `new` exactly, else layout."""
    tensors = [(i, t) for i, t in enumerate(_initializers(new)) if t.start >= 0]
    if not tensors:
        raise DeltaError("onnx-tensor: no initializer with raw_data (not an ONNX model?)")
    olds = _base_tensors(base)
    by_hash = {sha256(base[t.start:t.end]): name for name, t in olds.items()}
    records, blobs = [], []
    for index, t in tensors:
        data = new[t.start:t.end]
        rec: dict = {"i": index, "n": len(data)}
        old_t = olds.get(t.name)
        old = base[old_t.start:old_t.end] if old_t else None
        alias = None if old == data else by_hash.get(sha256(data))
        width = _WIDTH.get(t.dtype, 1)
        width = width if len(data) % width == 0 else 1
        if old == data or alias is not None:
            rec.update(k="same", b=t.name if old == data else alias)
        elif old_t and (old_t.dtype, old_t.dims, len(old)) == (t.dtype, t.dims, len(data)):
            rec.update(k="sub", b=t.name, w=width)
            blobs.append(_sub_encode(data, old, width))
        else:
            rec.update(k="raw", w=width)
            blobs.append(_planes(data, width))
        records.append(rec)
    blob = b"".join(blobs)
    structure = _proto_structure(new, [i for i, _ in tensors])
    if structure is not None:
        container = _container("proto", records, structure, blob)
        try:
            if _tensor_unpack(base, container) == new:
                return container
        except Exception as exc:  # any failure of the re-serialization path means: use the layout
            log.info("onnx-tensor: proto mode does not rebuild the file (%s); using layout mode", exc)
    literal, ats = _cut(new, [t for _, t in tensors])
    for rec, at in zip(records, ats):
        rec["at"] = at
    container = _container("layout", records, literal, blob)
    if _tensor_unpack(base, container) != new:
        raise DeltaError("onnx-tensor: layout mode does not rebuild the file (bug)")
    return container


def _proto_structure(new: bytes, stripped: list[int]) -> bytes | None:
    try:
        model = _parse_model(new)
        for i in stripped:
            model.graph.initializer[i].ClearField("raw_data")
        return model.SerializeToString(deterministic=True)
    except Exception as exc:  # onnx missing or the file does not parse as one ModelProto
        log.info("onnx-tensor: proto mode unavailable (%s)", exc)
        return None


def _parse_model(data: bytes):
    import onnx
    model = onnx.ModelProto()
    model.ParseFromString(data)
    return model


def _container(mode: str, records: list[dict], structure: bytes, blob: bytes) -> bytes:
    index = json.dumps({"mode": mode, "records": records}, separators=(",", ":")).encode()
    return _CONTAINER_MAGIC + struct.pack("<IQ", len(index), len(structure)) + index + structure + blob


def _tensor_unpack(base: bytes, container: bytes) -> bytes:
    if container[:4] != _CONTAINER_MAGIC:
        raise DeltaError("onnx-tensor: bad container magic")
    n_index, n_structure = struct.unpack_from("<IQ", container, 4)
    pos = 16 + n_index + n_structure
    index, structure = json.loads(container[16:16 + n_index]), container[16 + n_index:pos]
    olds = _base_tensors(base)
    datas = []
    for rec in index["records"]:
        kind, n = rec["k"], rec["n"]
        old = base[olds[rec["b"]].start:olds[rec["b"]].end] if kind in ("same", "sub") else b""
        blob, pos = (b"", pos) if kind == "same" else (container[pos:pos + n], pos + n)
        if kind == "same":
            data = old
        elif kind == "sub":
            data = _sub_decode(blob, old, rec["w"])
        elif kind == "raw":
            data = _unplanes(blob, rec["w"])
        else:
            raise DeltaError(f"onnx-tensor: unknown record kind {kind!r}")
        if len(data) != n:
            raise DeltaError(f"onnx-tensor: tensor #{rec['i']} rebuilt to {len(data)} bytes, expected {n}")
        datas.append(data)
    if pos != len(container):
        raise DeltaError(f"onnx-tensor: the container has {len(container)} bytes, its index says {pos}")
    if index["mode"] == "layout":
        out, prev = [], 0
        for rec, data in zip(index["records"], datas):
            out += [structure[prev:rec["at"]], data]
            prev = rec["at"]
        return b"".join(out) + structure[prev:]
    model = _parse_model(structure)
    for rec, data in zip(index["records"], datas):
        model.graph.initializer[rec["i"]].raw_data = data
    return model.SerializeToString(deterministic=True)


def _structure_dict(zstd, base: bytes):
    """The base's bytes outside its tensor data: the new model's structure is mostly the same."""
    return _raw_dict(zstd, _cut(base, [t for t in _initializers(base) if t.start >= 0])[0])


def _tensor_encode(base: bytes, new: bytes) -> bytes:
    zstd = _require("zstandard")
    container = _tensor_pack(base, new)
    cctx = zstd.ZstdCompressor(level=TENSOR_LEVEL, dict_data=_structure_dict(zstd, base), write_checksum=True)
    return cctx.compress(container)


def _tensor_decode(base: bytes, payload: bytes, header: dict) -> bytes:
    zstd = _require("zstandard")
    bound = 2 * header["result_size"] + (1 << 20)  # container <= tensor data + structure + index
    size = zstd.frame_content_size(payload)
    if not 0 <= size <= bound:
        raise DeltaError(f"onnx-tensor: zstd frame declares {size} bytes (bound {bound})")
    dctx = zstd.ZstdDecompressor(dict_data=_structure_dict(zstd, base))
    return _tensor_unpack(base, dctx.decompress(payload, max_output_size=bound))


_METHODS: dict[str, _Method] = {
    BSDIFF4: _Method(lambda base, new: _require("bsdiff4").diff(base, new),
                     lambda base, payload, header: _require("bsdiff4").patch(base, payload), ("bsdiff4",)),
    ZSTD_PATCH_FROM: _Method(_patch_encode, _patch_decode, ("zstandard",)),
    ONNX_TENSOR: _Method(_tensor_encode, _tensor_decode, ("zstandard", "numpy")),
}
