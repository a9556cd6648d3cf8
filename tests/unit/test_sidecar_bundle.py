"""sidecar.bundle (+ sidecar.cli): deterministic signed bundles, verified before and while they are staged."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from builder.optimize.manifest import manifest_sha256
from edgestack.cli import main
from sidecar import bundle as B
from sidecar.bundle_types import ExpectedOutput, VerifiedBundle
from sidecar.errors import BundleError, DiskSpaceError, ExpiredError, RollbackError, SignatureError
from sidecar.keys import generate_key
from sidecar.trust import TrustStore, canonical_json, format_time, make_root, sign
from tests.conftest import MODEL

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
LATER = format_time(NOW + timedelta(days=90))
FILES = {"model.onnx": os.urandom(3000), "model.py": b"print('hi')\n", "backends/ops/labels.txt": b"person\ncar\n"}
shutil_usage = namedtuple("usage", "total used free")
EXPECTED = {"image_b64": base64.b64encode(b"\x89PNG...").decode(), "boxes": [[1.0, 2.0, 30.5, 40.0]],
            "scores": [0.9], "class_ids": [0]}


@pytest.fixture(scope="module")
def keys():
    return {"root": [generate_key()], "bundle": [generate_key(), generate_key()], "other": [generate_key()]}


@pytest.fixture
def trust(tmp_path, keys):
    store = TrustStore(tmp_path / "trust")
    store.initialize(sign(make_root(version=1, expires=LATER, root_keys=keys["root"], root_threshold=1,
                                    bundle_keys=keys["bundle"], bundle_threshold=2), keys["root"]))
    return store


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "detect_detector" / "1"
    for rel, data in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def make(model_dir, out, all_keys, version=1, **kw):
    options = dict(model_name="detect_detector", model_version="1.2.0", target="cpu", metadata_version=version,
                   keys=all_keys["bundle"], expires=LATER)
    return B.create_bundle(model_dir, out, **{**options, **kw})


def meta(files: dict[str, bytes], version=1, **extra) -> dict:
    return {"_type": "bundle", "version": version, "expires": LATER, "model_name": "detect_detector",
            "model_version": "1.2.0", "target": "cpu", "device_classes": {"built_for": ["x86-avx2", "x86-vnni"]},
            "files": {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()},
            **extra}


def write_tar(path: Path, members) -> Path:
    """members: (name, bytes) for regular files, or (name, tarfile type, linkname) for anything else."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if len(rest) == 1:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tar.addfile(info)
    return path


def crafted(tmp_path, keys, members, signed=None) -> Path:
    envelope = canonical_json(sign(signed or meta(FILES), keys["bundle"]))
    return write_tar(tmp_path / "crafted.bundle", [("metadata.json", envelope), *members])


def good_members(files=FILES):
    return [(f"files/{rel}", data) for rel, data in files.items()]


# --- the happy path ---------------------------------------------------------------------------------------

def test_valid_bundle_verifies_and_files_match(tmp_path, keys, trust, model_dir):
    manifest = {"format": 1, "variant": {"name": "ort-fp32"}}
    path = make(model_dir, tmp_path / "b.bundle", keys, config_pbtxt='name: "detect_detector"\n',
                build_manifest=manifest, expected_outputs=[EXPECTED, ExpectedOutput(**EXPECTED)])
    names = tarfile.open(path).getnames()
    assert names == ["metadata.json"] + [f"files/{rel}" for rel in sorted(FILES)]
    staging = tmp_path / "staging"
    result = B.verify_bundle(path, trust, staging, now=NOW)
    assert isinstance(result, VerifiedBundle)
    assert (result.model_name, result.version, result.target, result.metadata_version) == \
        ("detect_detector", "1.2.0", "cpu", 1)
    assert set(result.files) == set(FILES)
    for rel, data in FILES.items():
        assert result.files[rel] == staging / rel and result.files[rel].read_bytes() == data
        assert result.file_hashes[rel] == hashlib.sha256(data).hexdigest()
    assert result.config_pbtxt == 'name: "detect_detector"\n' and result.build_manifest == manifest
    assert result.expected_outputs == (ExpectedOutput(**EXPECTED),) * 2
    assert trust.trusted_version("detect_detector") is None  # verify never raises the floor by itself
    trust.remember(result.signed)
    assert trust.trusted_version("detect_detector") == 1


def test_same_inputs_give_the_same_bytes(tmp_path, keys, model_dir):
    first = make(model_dir, tmp_path / "a.bundle", keys).read_bytes()
    os.utime(model_dir / "model.onnx", (1, 1))  # mtimes, owners and folder order do not leak into the bundle
    (model_dir / "__pycache__").mkdir()
    (model_dir / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"cache")
    assert make(model_dir, tmp_path / "b.bundle", keys).read_bytes() == first
    assert make(model_dir, tmp_path / "c.bundle", keys, version=2).read_bytes() != first


def test_create_refuses_links_and_bad_fields(tmp_path, keys, model_dir):
    with pytest.raises(BundleError, match="model_version"):
        make(model_dir, tmp_path / "x", keys, model_version="1.2")
    with pytest.raises(BundleError, match="target"):
        make(model_dir, tmp_path / "x", keys, target="tpu")
    with pytest.raises(BundleError, match="expected_outputs"):
        make(model_dir, tmp_path / "x", keys, expected_outputs=[{**EXPECTED, "scores": []}])
    (model_dir / "link").symlink_to(model_dir / "model.py")
    with pytest.raises(BundleError, match="symbolic link"):
        make(model_dir, tmp_path / "x", keys)
    assert not (tmp_path / "x").exists()


def test_real_model_round_trip(tmp_path, keys, trust):
    if not MODEL.is_file():
        pytest.skip(f"fixture model missing at {MODEL}")
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(MODEL.read_bytes())
    result = B.verify_bundle(make(folder, tmp_path / "real.bundle", keys), trust, tmp_path / "s", now=NOW)
    assert result.file_hashes["model.onnx"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert result.files["model.onnx"].stat().st_size == MODEL.stat().st_size


# --- trust is checked before anything is extracted --------------------------------------------------------

def test_trust_failures_extract_nothing(tmp_path, keys, trust, model_dir):
    staging = tmp_path / "staging"
    with pytest.raises(SignatureError, match="1 valid signature from trusted keys, 2 needed"):
        B.verify_bundle(make(model_dir, tmp_path / "a", keys, keys=keys["bundle"][:1]), trust, staging, now=NOW)
    with pytest.raises(SignatureError, match="unknown key"):
        B.verify_bundle(make(model_dir, tmp_path / "b", keys, keys=keys["other"]), trust, staging, now=NOW)
    with pytest.raises(ExpiredError, match="freeze"):
        B.verify_bundle(make(model_dir, tmp_path / "c", keys), trust, staging, now=NOW + timedelta(days=91))
    assert not staging.exists()


def test_tampered_metadata_is_refused(tmp_path, keys, trust):
    envelope = sign(meta(FILES), keys["bundle"])
    envelope["signed"]["files"]["model.onnx"]["sha256"] = "0" * 64
    path = write_tar(tmp_path / "t", [("metadata.json", canonical_json(envelope)), *good_members()])
    with pytest.raises(SignatureError, match="0 valid signatures"):
        B.verify_bundle(path, trust, tmp_path / "s", now=NOW)


def test_rollback_and_replay_bundles_are_refused(tmp_path, keys, trust, model_dir):
    trust.remember(B.verify_bundle(make(model_dir, tmp_path / "v2", keys, version=2), trust,
                                   tmp_path / "s2", now=NOW).signed)
    with pytest.raises(RollbackError, match="older"):
        B.verify_bundle(make(model_dir, tmp_path / "v1", keys, version=1), trust, tmp_path / "s1", now=NOW)
    (model_dir / "model.py").write_bytes(b"print('evil')\n")
    with pytest.raises(RollbackError, match="differs"):
        B.verify_bundle(make(model_dir, tmp_path / "v2b", keys, version=2), trust, tmp_path / "s3", now=NOW)
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s3").exists()
    assert B.verify_bundle(make(model_dir, tmp_path / "v3", keys, version=3), trust, tmp_path / "s4", now=NOW)


# --- malformed or hostile contents ----------------------------------------------------------------------

def test_same_size_different_bytes_is_a_hash_error(tmp_path, keys, trust):
    evil = {**FILES, "model.py": b"print('ho')\n"}
    staging = tmp_path / "staging"
    with pytest.raises(BundleError, match="model.py: sha256 .* differs"):
        B.verify_bundle(crafted(tmp_path, keys, good_members(evil)), trust, staging, now=NOW)
    assert not staging.exists()


class CountingReader:
    def __init__(self, f):
        self.f, self.read_bytes = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_member_bigger_than_declared_is_never_fully_read(tmp_path, keys, trust, monkeypatch):
    files = {"model.onnx": b"m" * 1000}
    big = os.urandom(8 * B.CHUNK)
    path = crafted(tmp_path, keys, [("files/model.onnx", big)], signed=meta(files))
    readers = []
    monkeypatch.setattr(B, "_open_bundle", lambda p: readers.append(CountingReader(open(p, "rb"))) or readers[-1])
    with pytest.raises(BundleError, match="model.onnx: 8388608 bytes in the bundle, 1000 in the signed metadata"):
        B.verify_bundle(path, trust, tmp_path / "staging", now=NOW)
    data_offset = tarfile.open(path).getmember("files/model.onnx").offset_data
    assert readers[0].read_bytes <= data_offset + 1000 + B.CHUNK < len(big)
    assert not (tmp_path / "staging").exists()


def test_truncated_member_is_refused(tmp_path, keys, trust):
    path = crafted(tmp_path, keys, good_members())
    data = path.read_bytes()
    offset = tarfile.open(path).getmember("files/model.onnx").offset_data
    path.write_bytes(data[:offset + 100])
    with pytest.raises(BundleError):
        B.verify_bundle(path, trust, tmp_path / "staging", now=NOW)
    assert not (tmp_path / "staging").exists()


HOSTILE = {
    "unlisted member": ([*good_members(), ("files/extra.so", b"x")], "not listed"),
    "missing member": (good_members()[:-1], "missing"),
    "dot-dot path": ([*good_members(), ("files/../../evil.py", b"x")], "traversal"),
    "absolute path": ([*good_members(), ("/tmp/evil.py", b"x")], "unexpected member"),
    "symlink member": ([("files/model.onnx", tarfile.SYMTYPE, "/etc/passwd"), *good_members()[1:]], "not a regular"),
    "hard link member": ([*good_members()[1:], ("files/model.onnx", tarfile.LNKTYPE, "files/model.py")], "not a regular"),
    "device member": ([("files/model.onnx", tarfile.CHRTYPE, ""), *good_members()[1:]], "not a regular"),
    "folder member": ([("files/backends", tarfile.DIRTYPE, ""), *good_members()], "not a regular"),
    "duplicate member": ([*good_members(), good_members()[0]], "more than once"),
    "second metadata": ([*good_members(), ("metadata.json", b"{}")], "more than once"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_staging_removed(tmp_path, keys, trust, case):
    members, message = HOSTILE[case]
    staging = tmp_path / "staging"
    with pytest.raises(BundleError, match=message):
        B.verify_bundle(crafted(tmp_path, keys, members), trust, staging, now=NOW)
    assert not staging.exists()
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


@pytest.mark.parametrize("bad", ["../evil.py", "/etc/passwd", "a/./b", "a//b", "a\\b", ""])
def test_signed_metadata_with_unsafe_paths_is_refused(tmp_path, keys, trust, bad):
    signed = meta(FILES)
    signed["files"][bad] = signed["files"]["model.py"]
    with pytest.raises(BundleError, match="unsafe"):
        B.verify_bundle(crafted(tmp_path, keys, good_members(), signed=signed), trust, tmp_path / "s", now=NOW)
    assert not (tmp_path / "s").exists()


def test_metadata_must_come_first_bounded_and_unambiguous(tmp_path, keys, trust, model_dir):
    envelope = canonical_json(sign(meta(FILES), keys["bundle"]))
    later = write_tar(tmp_path / "late", [*good_members(), ("metadata.json", envelope)])
    with pytest.raises(BundleError, match="first member must be metadata.json"):
        B.verify_bundle(later, trust, tmp_path / "s", now=NOW)
    with pytest.raises(BundleError, match="more than the 100 allowed"):
        B.verify_bundle(make(model_dir, tmp_path / "b", keys), trust, tmp_path / "s", now=NOW, max_metadata_bytes=100)
    dup = write_tar(tmp_path / "dup", [("metadata.json", b'{"signed": {}, "signed": {}, "signatures": []}')])
    with pytest.raises(BundleError, match="repeats a key"):
        B.verify_bundle(dup, trust, tmp_path / "s", now=NOW)
    (tmp_path / "junk").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(BundleError, match="not a readable bundle"):
        B.verify_bundle(tmp_path / "junk", trust, tmp_path / "s", now=NOW)
    assert not (tmp_path / "s").exists()


def test_not_enough_disk_is_refused_before_staging(tmp_path, keys, trust, model_dir, monkeypatch):
    path = make(model_dir, tmp_path / "b", keys)
    monkeypatch.setattr(B.shutil, "disk_usage", lambda p: shutil_usage(total=100, used=90, free=10))
    with pytest.raises(DiskSpaceError, match="staging needs"):
        B.verify_bundle(path, trust, tmp_path / "staging", now=NOW)
    assert not (tmp_path / "staging").exists()


def test_non_empty_staging_is_left_alone(tmp_path, keys, trust, model_dir):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="absent or empty"):
        B.verify_bundle(make(model_dir, tmp_path / "b", keys), trust, staging, now=NOW)
    assert (staging / "keep.txt").read_text() == "mine"


# --- CLI ----------------------------------------------------------------------------------------------------

def run_cli(*argv) -> int:
    """`edgestack ARGV...`: errors are reported by the CLI's main, exit code 2."""
    return main([str(a) for a in argv])


def test_cli_keys_bundle_and_rotation(tmp_path, model_dir, capsys):
    k1, k2 = tmp_path / "keys1", tmp_path / "keys2"
    assert run_cli("keys", "init", "--dir", k1, "--root-keys", 3, "--root-threshold", 2, "--bundle-keys", 2,
                   "--bundle-threshold", 2) == 0
    assert sorted(p.name for p in k1.iterdir()) == [
        "bundle-1.pem", "bundle-2.pem", "root-1.pem", "root-2.pem", "root-3.pem", "root.json"]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in k1.glob("*.pem"))
    assert run_cli("keys", "init", "--dir", k1) == 2
    assert "refusing to overwrite keys" in capsys.readouterr().err
    (tmp_path / "expected.json").write_text(json.dumps([EXPECTED]))
    (tmp_path / "config.pbtxt").write_text('name: "detect_detector"\n')
    assert run_cli("bundle", "create", model_dir, "--model-name", "detect_detector", "--model-version", "1.2.0",
                   "--target", "cpu", "--metadata-version", 1, "--keys", k1, "--out", tmp_path / "b1.bundle",
                   "--config", tmp_path / "config.pbtxt", "--expected-outputs", tmp_path / "expected.json") == 0
    trust = TrustStore(tmp_path / "device")
    trust.initialize(json.loads((k1 / "root.json").read_text()))
    result = B.verify_bundle(tmp_path / "b1.bundle", trust, tmp_path / "s1")
    assert result.config_pbtxt == 'name: "detect_detector"\n' and len(result.expected_outputs) == 1

    manifest = {"format": 1, "variant": {"name": "ort-fp32"}, "metrics": {"map50": 0.5}}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    create = ["bundle", "create", model_dir, "--model-name", "detect_detector", "--model-version", "1.2.0",
              "--target", "cpu", "--keys", k1, "--build-manifest", tmp_path / "manifest.json"]
    assert run_cli(*create, "--metadata-version", 2, "--out", tmp_path / "m.bundle") == 0
    assert B.verify_bundle(tmp_path / "m.bundle", trust, tmp_path / "sm").build_manifest == manifest
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "metrics": {"map50": 0.9}}))
    assert run_cli(*create, "--metadata-version", 3, "--out", tmp_path / "m3.bundle") == 2
    assert "manifest_sha256 does not match" in capsys.readouterr().err

    assert run_cli("keys", "rotate", "--dir", k1, "--new-dir", k2) == 0
    trust.update_root(json.loads((k2 / "root.json").read_text()))
    assert trust.root.version == 2
    with pytest.raises(SignatureError):  # old bundle keys are gone from the new root
        B.verify_bundle(tmp_path / "b1.bundle", trust, tmp_path / "s2")
    assert run_cli("bundle", "create", model_dir, "--model-name", "detect_detector", "--model-version", "1.2.1",
                   "--target", "cpu", "--metadata-version", 2, "--keys", k2, "--out", tmp_path / "b2.bundle") == 0
    assert B.verify_bundle(tmp_path / "b2.bundle", trust, tmp_path / "s3").metadata_version == 2


@pytest.mark.parametrize("argv", [["keys"], ["keys", "init"], ["keys", "rotate"], ["bundle"], ["bundle", "create"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(*argv, "--help")
    assert exit_.value.code == 0 and "usage: edgestack" in capsys.readouterr().out


def test_cli_signs_the_device_classes(tmp_path, model_dir, capsys):
    keys = tmp_path / "keys"
    assert run_cli("keys", "init", "--dir", keys) == 0
    (model_dir / "model.onnx").write_bytes(b"\x08\x07QLinearConv")  # an INT8 graph's op names
    create = ["bundle", "create", model_dir, "--model-name", "detect_detector", "--model-version", "1.2.0",
              "--target", "cpu", "--keys", keys]
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "a.bundle") == 2
    assert "model.onnx is an INT8 model" in capsys.readouterr().err
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "b.bundle", "--verified-on", "x86-vnni") == 2
    assert "--verified-on needs --device-class" in capsys.readouterr().err
    assert run_cli(*create, "--metadata-version", 1, "--out", tmp_path / "c.bundle", "--device-class", "x86-vnni",
                   "--device-class", "x86-avx2", "--verified-on", "x86-vnni") == 0
    signed = B.read_signed_unverified(tmp_path / "c.bundle")
    assert signed["device_classes"] == {"built_for": ["x86-vnni", "x86-avx2"], "verified_on": ["x86-vnni"], "notes": {}}
    trust = TrustStore(tmp_path / "device")
    trust.initialize(json.loads((keys / "root.json").read_text()))
    assert B.verify_bundle(tmp_path / "c.bundle", trust, tmp_path / "s").device_classes == signed["device_classes"]
