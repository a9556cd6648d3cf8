"""Binary deltas of model files: byte-identical round trips, wrong base, corrupt deltas, best_delta.

The compressing methods need bsdiff4 / zstandard; their tests skip where those are not installed.
The onnx-tensor container (everything but the final zstd step) and the delta framing are tested
everywhere, the framing through test-only methods registered in the method table.
bsdiff4 runs on the small cases only (config text, 2.4 MB quantized models), not the 8 MB fp32 ones.
"""
from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import onnx
import pytest

from sidecar import delta as D
from sidecar import delta_onnx
from sidecar.errors import DeltaError
from tests.conftest import MODEL

CONFIG = b'name: "detect_detector"\nbackend: "python"\nmax_batch_size: 8\ninstance_group { count: 2 kind: KIND_CPU }\n'
HAVE = {m: importlib.util.find_spec(m) is not None for m in ("bsdiff4", "zstandard")}


def float_weights(model: onnx.ModelProto, min_bytes: int = 0):
    return [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) > min_bytes]


def head_initializers(model: onnx.ModelProto, count: int = 6) -> list[str]:
    """Float weights feeding the last nodes before the outputs, nearest first."""
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name for t in float_weights(model, 255)}
    frontier, seen, found = [o.name for o in model.graph.output], set(), []
    while frontier and len(found) < count:
        node = producers.get(frontier.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in node.input:
            if name in weights and name not in found:
                found.append(name)
            elif name in producers:
                frontier.append(name)
    return found


def perturbed(base: bytes, names: set[str] | None, scale: float = 1e-2, seed: int = 0) -> bytes:
    model = onnx.load_from_string(base)
    rng = np.random.default_rng(seed)
    for t in float_weights(model):
        if names is None or t.name in names:
            a = np.frombuffer(t.raw_data, np.float32)
            t.raw_data = (a + rng.normal(0, scale * (float(a.std()) + 1e-6), a.shape)).astype(np.float32).tobytes()
    return model.SerializeToString()


@pytest.fixture(scope="module")
def base() -> bytes:
    return MODEL.read_bytes()


@pytest.fixture(scope="module")
def cases(base, tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    model = onnx.load_from_string(base)
    model.doc_string = "CenterNet MobileNetV3, retrained 2026-11"
    model.metadata_props.add(key="edgestack.version", value="1.4.0")
    metadata = model.SerializeToString()
    head = perturbed(base, set(head_initializers(onnx.load_from_string(base))))
    full = perturbed(base, None)
    out = {"metadata": (base, metadata), "head": (base, head), "full": (base, full),
           "config": (CONFIG, CONFIG.replace(b"count: 2", b"count: 4"))}
    try:
        from onnxruntime.quantization import quantize_dynamic
    except ImportError:
        return out
    tmp = tmp_path_factory.mktemp("quant")
    quantize_dynamic(str(MODEL), str(tmp / "a.onnx"))
    quantize_dynamic(str(MODEL), str(tmp / "b.onnx"), reduce_range=True)
    out["requant"] = ((tmp / "a.onnx").read_bytes(), (tmp / "b.onnx").read_bytes())
    return out


@pytest.fixture(autouse=True)
def fast_levels(monkeypatch):
    # Compression levels change sizes, never correctness; level 19 on 8 MB takes seconds.
    for module, name in ((D, "PATCH_LEVEL"), (delta_onnx, "TENSOR_LEVEL"), (D, "FULL_LEVEL")):
        monkeypatch.setattr(module, name, 3)


def container_index(container: bytes) -> dict:
    n, _ = struct.unpack_from("<IQ", container, 4)
    return json.loads(container[16:16 + n])


# ---------------------------------------------------------------- onnx-tensor container, no zstd needed

def test_changed_tensors_are_found_as_expected(base, cases):
    head_names = set(head_initializers(onnx.load_from_string(base)))
    assert len(head_names) == 6
    kinds = {}
    for name in ("metadata", "head", "full"):
        index = container_index(delta_onnx._tensor_pack(*cases[name]))
        assert index["mode"] == "proto"  # onnx re-serializes this file byte-stably
        kinds[name] = [r["k"] for r in index["records"]]
    assert set(kinds["metadata"]) == {"same"}
    assert kinds["head"].count("sub") == 6 and kinds["head"].count("raw") == 0
    assert kinds["full"].count("sub") > 0.8 * len(kinds["full"])


def test_full_fine_tune_changes_nearly_every_weight(cases):
    base, new = cases["full"]
    old_w = np.concatenate([np.frombuffer(t.raw_data, np.uint32) for t in float_weights(onnx.load_from_string(base))])
    new_w = np.concatenate([np.frombuffer(t.raw_data, np.uint32) for t in float_weights(onnx.load_from_string(new))])
    assert np.mean(old_w != new_w) > 0.9


@pytest.mark.parametrize("name", ["metadata", "head", "full", "requant"])
def test_container_round_trips_byte_identically(cases, name):
    if name not in cases:
        pytest.skip("onnxruntime.quantization not available")
    base, new = cases[name]
    assert delta_onnx._tensor_unpack(base, delta_onnx._tensor_pack(base, new)) == new


def test_layout_mode_when_reserialization_is_not_byte_stable(cases):
    base, new = cases["head"]
    odd = b"\x08\x07" + new  # a duplicated ir_version field: parses the same, re-serializes without it
    assert onnx.load_from_string(odd).SerializeToString(deterministic=True) != odd
    container = delta_onnx._tensor_pack(base, odd)
    assert container_index(container)["mode"] == "layout"
    assert delta_onnx._tensor_unpack(base, container) == odd


# ---------------------------------------------------------------- framing, through test-only methods

@pytest.fixture
def fake_methods(monkeypatch):
    calls = []

    def spy_decode(base, payload, header):
        calls.append(len(base))
        return payload

    methods = dict(D._METHODS)
    methods.update({
        "copy": D._Method(lambda base, new: new, spy_decode, ()),
        "padded": D._Method(lambda base, new: new + b"\0" * 64, lambda b, p, h: p[:-64], ()),
        "liar": D._Method(lambda base, new: new[:1], lambda b, p, h: p, ()),  # smallest, never verifies
        "tensor-raw": D._Method(delta_onnx._tensor_pack, lambda b, p, h: delta_onnx._tensor_unpack(b, p),
                                ("numpy",)),
    })
    monkeypatch.setattr(D, "_METHODS", methods)
    return calls


def test_header_states_base_and_result(fake_methods, cases):
    base, new = cases["config"]
    delta = D.make_delta(base, new, "copy")
    header = D.read_header(delta)
    assert header["method"] == "copy"
    assert (header["base_sha256"], header["base_size"]) == (D.sha256(base), len(base))
    assert (header["result_sha256"], header["result_size"]) == (D.sha256(new), len(new))
    assert D.apply_delta(base, delta) == new


def test_wrong_base_is_refused_before_decoding(fake_methods, cases):
    base, new = cases["config"]
    delta = D.make_delta(base, new, "copy")
    fake_methods.clear()
    with pytest.raises(DeltaError, match="wrong base"):
        D.apply_delta(base + b" ", delta)
    with pytest.raises(DeltaError, match="wrong base"):
        D.apply_delta(base.replace(b"8", b"9"), delta)  # same size, other content
    assert fake_methods == []


@pytest.mark.parametrize("damage", ["payload", "header", "truncate", "magic", "header-length"])
def test_corrupt_delta_is_refused(fake_methods, cases, damage):
    base, new = cases["head"]
    delta = bytearray(D.make_delta(base, new, "tensor-raw"))
    start = len(D.MAGIC) + 4
    if damage == "payload":
        delta[-1000] ^= 0x40
    elif damage == "header":
        delta[start + 5] = ord("?")
    elif damage == "truncate":
        del delta[-10:]
    elif damage == "magic":
        delta[0] ^= 1
    else:
        delta[len(D.MAGIC):start] = struct.pack(">I", 10 ** 9)
    with pytest.raises(DeltaError):
        D.apply_delta(base, bytes(delta))


def test_corrupt_payload_with_a_consistent_header_is_caught_by_the_decoder_or_result_hash(fake_methods, cases):
    base, new = cases["head"]
    payload = delta_onnx._tensor_pack(base, new)
    for damaged in (payload[:-7], payload[:20] + b"{" + payload[21:], payload[:-5000] + bytes(5000)):
        with pytest.raises(DeltaError):
            D.apply_delta(base, D._frame("tensor-raw", base, new, damaged))


def test_onnx_tensor_refuses_a_non_onnx_file(fake_methods, cases):
    base, new = cases["config"]
    with pytest.raises(DeltaError, match="tensor-raw: cannot make a delta"):
        D.make_delta(base, new, "tensor-raw")
    with pytest.raises(DeltaError, match="no initializer"):
        D.make_delta(b"", b"", "tensor-raw")


def test_unknown_method_is_refused(cases):
    with pytest.raises(DeltaError, match="unknown"):
        D.make_delta(*cases["config"], "xdelta3")


def test_best_delta_picks_the_smallest_that_verifies(fake_methods, monkeypatch, cases):
    base, new = cases["head"]
    monkeypatch.setattr(D, "full_file_size", lambda data: len(data))
    method, delta = D.best_delta(base, new, ["copy", "padded", "liar", "tensor-raw"])
    assert method == "tensor-raw"  # "liar" is smaller but does not verify
    assert D.apply_delta(base, delta) == new
    monkeypatch.setattr(D, "full_file_size", lambda data: 100)
    assert D.best_delta(base, new, ["copy", "tensor-raw"]) == (D.FULL, b"")


def test_best_delta_skips_methods_whose_package_is_missing(fake_methods, monkeypatch, cases):
    base, new = cases["config"]
    monkeypatch.setitem(D._METHODS, "needs-missing", D._Method(lambda b, n: b"", lambda b, p, h: b"", ("no_such_pkg_x",)))
    monkeypatch.setattr(D, "full_file_size", lambda data: 10 ** 9)
    assert "needs-missing" not in D.available_methods()
    assert D.best_delta(base, new, ["needs-missing", "padded"])[0] == "padded"


# ---------------------------------------------------------------- the real methods, where installed

REAL = [(D.BSDIFF4, "config"), (D.BSDIFF4, "requant")] + [
    (m, c) for m in (D.ZSTD_PATCH_FROM, D.ONNX_TENSOR) for c in ("config", "metadata", "head", "full", "requant")]


def needs(method: str) -> None:
    module = "bsdiff4" if method == D.BSDIFF4 else "zstandard"
    if not HAVE[module]:
        pytest.skip(f"{module} is not installed")


@pytest.mark.parametrize("method,name", REAL)
def test_method_round_trips_byte_identically(cases, method, name):
    needs(method)
    if name not in cases:
        pytest.skip("onnxruntime.quantization not available")
    base, new = cases[name]
    if method == D.ONNX_TENSOR and name == "config":
        with pytest.raises(DeltaError):
            D.make_delta(base, new, method)
        return
    delta = D.make_delta(base, new, method)
    assert D.apply_delta(base, delta) == new
    if name != "config":
        assert len(delta) < len(new) / 2 or name == "full"
    with pytest.raises(DeltaError, match="wrong base"):
        D.apply_delta(new, delta)


@pytest.mark.parametrize("method", [D.ZSTD_PATCH_FROM, D.ONNX_TENSOR, D.BSDIFF4])
def test_method_maps_a_corrupt_payload_to_delta_error(cases, method):
    needs(method)
    base, new = cases["config"] if method == D.BSDIFF4 else cases["head"]
    payload = bytearray(D._split(D.make_delta(base, new, method))[1])
    payload[len(payload) // 2] ^= 0xFF
    with pytest.raises(DeltaError):
        D.apply_delta(base, D._frame(method, base, new, bytes(payload)))


def test_best_delta_with_real_methods(cases):
    if not HAVE["zstandard"]:
        pytest.skip("zstandard is not installed")
    base, new = cases["head"]  # 8 MB: bsdiff4 (seconds here) is left out
    methods = (D.ZSTD_PATCH_FROM, D.ONNX_TENSOR)
    method, delta = D.best_delta(base, new, methods)
    sizes = {m: len(D.make_delta(base, new, m)) for m in methods}
    assert method in sizes and len(delta) == min(sizes.values())
    assert D.apply_delta(base, delta) == new
