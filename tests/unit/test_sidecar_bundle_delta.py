"""Delta bundles (sidecar.bundle + sidecar.bundle_delta): shipped against a base, applied only on that base."""
from __future__ import annotations

import hashlib
import os
import tarfile

import numpy as np
import onnx
import pytest

from sidecar import bundle as B
from sidecar import delta as D
from sidecar.errors import BundleError
from sidecar.trust import canonical_json, sign
from tests.conftest import MODEL
from tests.unit.test_sidecar_bundle import FILES, NOW, keys, make, meta, run_cli, trust, write_tar  # noqa: F401

rng = np.random.default_rng(7)
ONNX_LIKE = bytes(rng.integers(0, 256, 20000, dtype=np.uint8))


def write_folder(folder, files):
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def few_bytes_changed(data: bytes, count: int = 12) -> bytes:
    out = bytearray(data)
    for i in range(count):
        out[(i * 997) % len(out)] ^= 0x5A
    return bytes(out)


@pytest.fixture
def versions(tmp_path):
    """v1 as built (the base) and v2: model.onnx with a few bytes changed, model.py unchanged, labels
    replaced by unrelated bytes (no delta beats the file), a new file."""
    v1 = write_folder(tmp_path / "v1", {**FILES, "model.onnx": ONNX_LIKE})
    v2 = write_folder(tmp_path / "v2", {"model.onnx": few_bytes_changed(ONNX_LIKE), "model.py": FILES["model.py"],
                                        "backends/ops/labels.txt": os.urandom(64), "new.txt": b"new file\n"})
    return v1, v2


def make_delta_bundle(v1, v2, out, keys, **kw):
    return make(v2, out, keys, base_dir=v1, base_model_version="1.1.0", **kw)


def test_delta_bundle_ships_only_what_changed_and_rebuilds_v2(tmp_path, keys, trust, versions):
    v1, v2 = versions
    path = make_delta_bundle(v1, v2, tmp_path / "d.bundle", keys)
    assert tarfile.open(path).getnames() == [
        "metadata.json", "files/backends/ops/labels.txt", "deltas/model.onnx", "files/new.txt"]
    signed = B.read_signed_unverified(path)
    assert signed["base"] == {"model_version": "1.1.0"}
    onnx_delta = signed["files"]["model.onnx"]["delta"]
    assert onnx_delta["method"] in D.ALL and onnx_delta["size"] < 2000
    assert onnx_delta["base_sha256"] == hashlib.sha256(ONNX_LIKE).hexdigest()
    assert signed["files"]["model.py"]["delta"]["method"] == "unchanged"
    full = make(v2, tmp_path / "full.bundle", keys)
    assert path.stat().st_size < full.stat().st_size - 15000

    staging = tmp_path / "staging"
    result = B.verify_bundle(path, trust, staging, base_dirs=[v1], now=NOW)
    for rel in ("model.onnx", "model.py", "backends/ops/labels.txt", "new.txt"):
        assert result.files[rel].read_bytes() == (v2 / rel).read_bytes()
        assert result.file_hashes[rel] == hashlib.sha256((v2 / rel).read_bytes()).hexdigest()
    assert result.base_version == "1.1.0"
    assert result.delivery == {"backends/ops/labels.txt": "full", "model.onnx": onnx_delta["method"],
                               "model.py": "unchanged", "new.txt": "full"}
    assert (v1 / "model.onnx").read_bytes() == ONNX_LIKE, "the base is never modified"


def test_delta_bundles_are_deterministic(tmp_path, keys, versions):
    v1, v2 = versions
    first = make_delta_bundle(v1, v2, tmp_path / "a", keys).read_bytes()
    assert make_delta_bundle(v1, v2, tmp_path / "b", keys).read_bytes() == first


def test_the_base_is_found_by_content_in_any_committed_folder(tmp_path, keys, trust, versions):
    v1, v2 = versions
    other = write_folder(tmp_path / "v0", {"model.onnx": b"older", "model.py": b"older"})
    path = make_delta_bundle(v1, v2, tmp_path / "d", keys)
    result = B.verify_bundle(path, trust, tmp_path / "s", base_dirs=[other, v1], now=NOW)
    assert result.files["model.onnx"].read_bytes() == (v2 / "model.onnx").read_bytes()


@pytest.mark.parametrize("device", ["no-base", "base-changed-on-disk"])
def test_a_device_without_the_exact_base_refuses_before_extracting(tmp_path, keys, trust, versions, device,
                                                                     monkeypatch):
    v1, v2 = versions
    path = make_delta_bundle(v1, v2, tmp_path / "d", keys)
    bases = []
    if device == "base-changed-on-disk":
        (v1 / "model.onnx").write_bytes(few_bytes_changed(ONNX_LIKE, 1))
        bases = [v1]
    extracted = []
    monkeypatch.setattr(B, "_extract", lambda *a: extracted.append(a))
    staging = tmp_path / "staging"
    with pytest.raises(BundleError, match=r"model.onnx: this is a delta against base 1.1.0 .* install the full bundle"):
        B.verify_bundle(path, trust, staging, base_dirs=bases, now=NOW)
    assert extracted == [] and not staging.exists()


def signed_tar(tmp_path, keys, files_meta, members, **extra):
    envelope = sign(meta({}, **extra) | {"files": files_meta}, keys["bundle"])
    return write_tar(tmp_path / "crafted.bundle", [("metadata.json", canonical_json(envelope))] + members)


def delta_entry(base: bytes, new: bytes, delta: bytes, method=D.BSDIFF4) -> dict:
    return {"sha256": hashlib.sha256(new).hexdigest(), "size": len(new),
            "delta": {"method": method, "base_sha256": hashlib.sha256(base).hexdigest(), "base_size": len(base),
                      "sha256": hashlib.sha256(delta).hexdigest(), "size": len(delta)}}


def test_tampered_delta_member_is_refused(tmp_path, keys, trust, versions):
    v1, _ = versions
    new = few_bytes_changed(ONNX_LIKE)
    delta = D.make_delta(ONNX_LIKE, new, D.BSDIFF4)
    tampered = delta[:-1] + bytes([delta[-1] ^ 1])
    path = signed_tar(tmp_path, keys, {"model.onnx": delta_entry(ONNX_LIKE, new, delta)},
                      [("deltas/model.onnx", tampered)], base={"model_version": "1.1.0"})
    with pytest.raises(BundleError, match="sha256 differs from the signed delta"):
        B.verify_bundle(path, trust, tmp_path / "s", base_dirs=[v1], now=NOW)
    assert not (tmp_path / "s").exists()


def test_a_delta_whose_result_differs_from_the_signed_file_is_refused(tmp_path, keys, trust, versions):
    """The signer signed a result hash; a (validly signed) delta producing other bytes must not be staged."""
    v1, _ = versions
    new, other = few_bytes_changed(ONNX_LIKE), few_bytes_changed(ONNX_LIKE, 3)
    delta = D.make_delta(ONNX_LIKE, other, D.BSDIFF4)
    entry = delta_entry(ONNX_LIKE, new, delta)
    path = signed_tar(tmp_path, keys, {"model.onnx": entry}, [("deltas/model.onnx", delta)],
                      base={"model_version": "1.1.0"})
    with pytest.raises(BundleError, match="model.onnx: rebuilt from the base"):
        B.verify_bundle(path, trust, tmp_path / "s", base_dirs=[v1], now=NOW)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("case,message", [
    ("full-member-for-delta", r"files/model.onnx is not listed in the signed metadata \(or not as a full file\)"),
    ("no-base-named", "has deltas but names no base version"),
    ("unchanged-but-different", "'unchanged' but the base and the result differ"),
    ("unknown-method", "delta method must be one of"),
    ("delta-member-missing", "listed file.* missing from the bundle: model.onnx"),
])
def test_malformed_delta_metadata_is_refused(tmp_path, keys, trust, versions, case, message):
    v1, _ = versions
    new = few_bytes_changed(ONNX_LIKE)
    delta = D.make_delta(ONNX_LIKE, new, D.BSDIFF4)
    entry, members, extra = delta_entry(ONNX_LIKE, new, delta), [("deltas/model.onnx", delta)], {
        "base": {"model_version": "1.1.0"}}
    if case == "full-member-for-delta":
        members = [("files/model.onnx", new)]
    elif case == "no-base-named":
        extra = {}
    elif case == "unchanged-but-different":
        entry["delta"] = {"method": "unchanged", "base_sha256": entry["delta"]["base_sha256"],
                          "base_size": len(ONNX_LIKE)}
        members = []
    elif case == "unknown-method":
        entry["delta"]["method"] = "xdelta"
    elif case == "delta-member-missing":
        members = []
    path = signed_tar(tmp_path, keys, {"model.onnx": entry}, members, **extra)
    with pytest.raises(BundleError, match=message):
        B.verify_bundle(path, trust, tmp_path / "s", base_dirs=[v1], now=NOW)
    assert not (tmp_path / "s").exists()


def test_create_refuses_half_a_delta_request(tmp_path, keys, versions):
    v1, v2 = versions
    with pytest.raises(BundleError, match="both the base folder and the base's model version"):
        make(v2, tmp_path / "x", keys, base_dir=v1)
    with pytest.raises(BundleError, match="unknown delta method"):
        make_delta_bundle(v1, v2, tmp_path / "x", keys, delta_methods=["xdelta"])
    assert not (tmp_path / "x").exists()


def test_real_model_head_fine_tune_travels_as_a_small_delta(tmp_path, keys, trust):
    if not MODEL.is_file():
        pytest.skip(f"fixture model missing at {MODEL}")
    model = onnx.load(MODEL)
    head = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) >= 256][-4:]
    for t in head:
        a = np.frombuffer(t.raw_data, np.float32)
        t.raw_data = (a * np.float32(1.01)).astype(np.float32).tobytes()
    v1 = write_folder(tmp_path / "v1", {"model.onnx": MODEL.read_bytes(), "model.py": b"x = 1\n"})
    v2 = write_folder(tmp_path / "v2", {"model.onnx": model.SerializeToString(), "model.py": b"x = 1\n"})
    path = make_delta_bundle(v1, v2, tmp_path / "d", keys)
    assert path.stat().st_size < MODEL.stat().st_size / 20
    result = B.verify_bundle(path, trust, tmp_path / "s", base_dirs=[v1], now=NOW)
    assert result.files["model.onnx"].read_bytes() == (v2 / "model.onnx").read_bytes()


def test_cli_delta_bundle_reports_what_travels(tmp_path, keys, versions, capsys):
    v1, v2 = versions
    k = tmp_path / "keys"
    assert run_cli("keys", "init", "--dir", k) == 0
    create = ["bundle", "create", v2, "--model-name", "detect_detector", "--model-version", "1.2.0", "--target",
              "cpu", "--metadata-version", 2, "--keys", k, "--out", tmp_path / "d.bundle"]
    assert run_cli(*create, "--base", v1) == 2
    assert "needs both --base and --base-version" in capsys.readouterr().err
    assert run_cli(*create, "--base", v1, "--base-version", "1.1.0", "--delta-methods", "bsdiff4") == 0
    out = capsys.readouterr().out
    assert "(delta against 1.1.0," in out and "model.py: unchanged, 0 of 12 bytes" in out
    assert "model.onnx: bsdiff4," in out and "backends/ops/labels.txt: full, 64 of 64 bytes" in out
