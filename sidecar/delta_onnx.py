"""The "onnx-tensor" delta method of sidecar/delta.py: tensor-aware deltas of ONNX model files.

Per initializer with raw_data: unchanged -> reference to the base tensor by name (or to any base tensor
with the same bytes); same name, dtype and shape -> the wrapping integer difference of the bit patterns per
element, zigzag-coded, split into byte planes; else stored whole (byte planes). The model without that
tensor data is stored whole. All of it goes into one container (below), zstd-compressed with the base's
own structure (its bytes outside the tensor data) as dictionary.

Container: b"OTD1" | u32 LE index length | u64 LE structure length | JSON index {"mode", "records"} |
structure | the records' blobs in order. Mode "proto" rebuilds the ModelProto with onnx's deterministic
serialization; mode "layout" (used when that is not byte-identical) keeps the file's own bytes outside
the tensor data, and each record's "at" says where its data goes back. Initializers are found by walking
the protobuf wire format directly, so making and applying a layout-mode delta does not need onnx.

delta.py frames the payload and checks the base and the result; tensor_encode / tensor_decode are the
(base, new) -> payload and (base, payload, header) -> result functions it registers for this method.
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Iterable, NamedTuple

import numpy as np

from sidecar.delta import raw_dict, require, sha256
from sidecar.errors import DeltaError

log = logging.getLogger(__name__)

TENSOR_LEVEL = 19  # zstd level used when making (server side); decoding speed does not depend on it

_CONTAINER_MAGIC = b"OTD1"
# Element width in bytes of ONNX TensorProto data types stored as raw_data (little-endian).
_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 4, 15: 8, 16: 2,
          17: 1, 18: 1, 19: 1, 20: 1}


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
    return raw_dict(zstd, _cut(base, [t for t in _initializers(base) if t.start >= 0])[0])


def tensor_encode(base: bytes, new: bytes) -> bytes:
    """The onnx-tensor payload turning `base` into `new`: the container, zstd-compressed."""
    zstd = require("zstandard")
    container = _tensor_pack(base, new)
    cctx = zstd.ZstdCompressor(level=TENSOR_LEVEL, dict_data=_structure_dict(zstd, base), write_checksum=True)
    return cctx.compress(container)


def tensor_decode(base: bytes, payload: bytes, header: dict) -> bytes:
    """The file an onnx-tensor payload rebuilds on top of `base` (delta.py checks it against `header`)."""
    zstd = require("zstandard")
    bound = 2 * header["result_size"] + (1 << 20)  # container <= tensor data + structure + index
    size = zstd.frame_content_size(payload)
    if not 0 <= size <= bound:
        raise DeltaError(f"onnx-tensor: zstd frame declares {size} bytes (bound {bound})")
    dctx = zstd.ZstdDecompressor(dict_data=_structure_dict(zstd, base))
    return _tensor_unpack(base, dctx.decompress(payload, max_output_size=bound))
