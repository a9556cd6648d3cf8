"""sidecar.keys and sidecar.trust: Ed25519 keys, threshold-signed envelopes, root rotation, freeze and rollback
protection."""
from __future__ import annotations

import hashlib
import json
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization

from sidecar.errors import ExpiredError, RollbackError, SignatureError, StateError, TrustError
from sidecar.keys import generate_key, key_id, load_private_key, load_public_key, save_private_key, save_public_key
from sidecar.trust import TrustStore, canonical_json, expires_in, format_time, make_root, sign, verify

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
LATER = format_time(NOW + timedelta(days=365))


def ids(keys):
    return {key_id(k): k.public_key() for k in keys}


@pytest.fixture(scope="module")
def keys():
    return {role: [generate_key() for _ in range(3)] for role in ("root", "bundle", "root2", "bundle2", "other")}


def root_envelope(keys, version=1, root="root", bundle="bundle", signers=None, expires=LATER, root_threshold=2,
                  bundle_threshold=2):
    signed = make_root(version=version, expires=expires, root_keys=keys[root], root_threshold=root_threshold,
                       bundle_keys=keys[bundle][:2], bundle_threshold=bundle_threshold)
    return sign(signed, signers if signers is not None else keys[root])


def bundle_meta(version=1, model="detect_detector", expires=LATER, **extra):
    return {"_type": "bundle", "version": version, "expires": expires, "model_name": model,
            "model_version": "1.0.0", "target": "cpu", "files": {}, **extra}


@pytest.fixture
def store(tmp_path, keys):
    store = TrustStore(tmp_path / "trust")
    store.initialize(root_envelope(keys))
    return store


# --- keys --------------------------------------------------------------------------------------------------

def test_key_id_is_sha256_of_raw_public_key(keys):
    key = keys["root"][0]
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest() == key_id(key)


def test_pem_round_trip_and_private_file_mode(tmp_path, keys):
    key = keys["root"][0]
    path = save_private_key(key, tmp_path / "k.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path)) == key_id(key)
    with pytest.raises(FileExistsError):
        save_private_key(generate_key(), path)  # never overwrites a key by accident
    pub = save_public_key(key, tmp_path / "k.pub")
    assert key_id(load_public_key(pub)) == key_id(key)
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(TrustError):
        load_private_key(tmp_path / "bad.pem")


# --- envelopes ------------------------------------------------------------------------------------------

def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": "é", "c": [1, 2]}) == '{"a":"é","b":1,"c":[1,2]}'.encode("utf-8")
    with pytest.raises(TrustError):
        canonical_json({"x": float("nan")})


def test_sign_and_verify_threshold(keys):
    signed = {"hello": "world", "n": 1}
    env = sign(signed, keys["root"][:2])
    assert verify(env, ids(keys["root"]), 2) == signed
    assert [s["keyid"] for s in env["signatures"]] == sorted(key_id(k) for k in keys["root"][:2])
    with pytest.raises(SignatureError, match="2 valid signatures from trusted keys, 3 needed"):
        verify(env, ids(keys["root"]), 3)


def test_signatures_by_one_key_count_once(keys):
    env = sign({"x": 1}, keys["root"][:1])
    env["signatures"] = env["signatures"] * 3
    with pytest.raises(SignatureError, match="1 valid signature from trusted keys, 2 needed"):
        verify(env, ids(keys["root"]), 2)


def test_unknown_keys_are_ignored_and_reported(keys):
    env = sign({"x": 1}, keys["root"][:1] + keys["other"])
    assert verify(env, ids(keys["root"]), 1) == {"x": 1}
    with pytest.raises(SignatureError, match=r"1 valid signature .* 2 needed .*3 signature\(s\) by unknown key"):
        verify(env, ids(keys["root"]), 2)
    with pytest.raises(SignatureError, match="0 valid signatures"):
        verify(sign({"x": 1}, keys["other"]), ids(keys["root"]), 1)


def test_tampered_signed_fields_and_bad_signatures_are_refused(keys):
    env = sign({"version": 1, "files": {"a": "00"}}, keys["root"][:2])
    tampered = json.loads(json.dumps(env))
    tampered["signed"]["files"]["a"] = "11"
    with pytest.raises(SignatureError, match=r"0 valid .*2 invalid signature"):
        verify(tampered, ids(keys["root"]), 1)
    garbage = {"signed": {"x": 1}, "signatures": [{"keyid": key_id(keys["root"][0]), "sig": "zz"}]}
    with pytest.raises(SignatureError):
        verify(garbage, ids(keys["root"]), 1)
    for bad in (None, [], {"signed": {}}, {"signed": [], "signatures": []}, {"signed": {}, "signatures": ["x"]}):
        with pytest.raises(SignatureError):
            verify(bad, ids(keys["root"]), 1)


def test_make_root_refuses_what_devices_refuse(keys, tmp_path):
    with pytest.raises(TrustError, match="threshold"):
        make_root(version=1, expires=LATER, root_keys=keys["root"][:1], root_threshold=2,
                  bundle_keys=keys["bundle"], bundle_threshold=1)
    signed = make_root(version=1, expires=LATER, root_keys=keys["root"], root_threshold=2,
                       bundle_keys=keys["bundle"], bundle_threshold=1)
    assert signed["roles"]["root"] == {"keyids": sorted(ids(keys["root"])), "threshold": 2}
    assert set(signed["keys"]) == set(ids(keys["root"])) | set(ids(keys["bundle"]))
    forged = json.loads(json.dumps(signed))  # one key listed under a second id, to be counted twice
    forged["keys"]["f" * 64] = forged["keys"][key_id(keys["root"][0])]
    forged["roles"]["root"]["keyids"].append("f" * 64)
    with pytest.raises(TrustError, match="not the sha256"):
        TrustStore(tmp_path / "t").initialize(sign(forged, keys["root"][:1]))


# --- trust on first use -------------------------------------------------------------------------------

def test_initialize_requires_self_signature_threshold(tmp_path, keys):
    store = TrustStore(tmp_path / "t")
    with pytest.raises(SignatureError, match="1 valid signature from trusted keys, 2 needed"):
        store.initialize(root_envelope(keys, signers=keys["root"][:1]))
    assert not store.initialized and not (tmp_path / "t" / "root.json").exists()
    store.initialize(root_envelope(keys))
    assert store.root.version == 1
    store.initialize(root_envelope(keys))  # the same root again: no-op
    with pytest.raises(TrustError, match="already trusts root v1"):
        store.initialize(root_envelope(keys, root="root2", bundle="bundle2"))


def test_uninitialized_store_refuses_bundles(tmp_path, keys):
    with pytest.raises(TrustError, match="no root"):
        TrustStore(tmp_path / "t").verify_bundle_metadata(sign(bundle_meta(), keys["bundle"][:2]), NOW)


# --- bundle metadata: signatures, freeze, rollback -----------------------------------------------------

def test_bundle_metadata_needs_bundle_role_threshold(store, keys):
    signed = bundle_meta()
    assert store.verify_bundle_metadata(sign(signed, keys["bundle"][:2]), NOW) == signed
    with pytest.raises(SignatureError, match="1 valid signature from trusted keys, 2 needed"):
        store.verify_bundle_metadata(sign(signed, keys["bundle"][:1]), NOW)
    with pytest.raises(SignatureError, match="0 valid"):  # root keys are not bundle keys
        store.verify_bundle_metadata(sign(signed, keys["root"]), NOW)
    with pytest.raises(SignatureError, match="unknown key"):
        store.verify_bundle_metadata(sign(signed, keys["other"]), NOW)
    with pytest.raises(TrustError, match="_type"):
        store.verify_bundle_metadata(sign({**signed, "_type": "root"}, keys["bundle"][:2]), NOW)


def test_expired_bundle_metadata_is_a_freeze_attack(store, keys):
    env = sign(bundle_meta(expires=format_time(NOW - timedelta(seconds=1))), keys["bundle"][:2])
    with pytest.raises(ExpiredError, match="freeze"):
        store.verify_bundle_metadata(env, NOW)
    with pytest.raises(ExpiredError):  # an expired trusted root stops bundles too, until it is rotated
        store.verify_bundle_metadata(sign(bundle_meta(expires=format_time(NOW + timedelta(days=999))),
                                          keys["bundle"][:2]), NOW + timedelta(days=400))
    with pytest.raises(TrustError, match="timezone"):
        store.verify_bundle_metadata(sign(bundle_meta(expires="2031-01-01T00:00:00"), keys["bundle"][:2]), NOW)


def test_rollback_and_replay_are_refused_after_remember(store, keys):
    v2 = bundle_meta(version=2)
    store.verify_bundle_metadata(sign(bundle_meta(version=1), keys["bundle"][:2]), NOW)  # nothing remembered yet
    store.remember(store.verify_bundle_metadata(sign(v2, keys["bundle"][:2]), NOW))
    assert store.trusted_version("detect_detector") == 2
    with pytest.raises(RollbackError, match="older than the installed v2"):
        store.verify_bundle_metadata(sign(bundle_meta(version=1), keys["bundle"][:2]), NOW)
    with pytest.raises(RollbackError, match="differs"):  # same version, different content
        store.verify_bundle_metadata(sign(bundle_meta(version=2, target="jetson"), keys["bundle"][:2]), NOW)
    assert store.verify_bundle_metadata(sign(v2, keys["bundle"][:2]), NOW) == v2  # identical: re-install is fine
    assert store.verify_bundle_metadata(sign(bundle_meta(version=3), keys["bundle"][:2]), NOW)["version"] == 3
    assert store.verify_bundle_metadata(sign(bundle_meta(version=1, model="other"), keys["bundle"][:2]), NOW)
    with pytest.raises(RollbackError):
        store.remember(bundle_meta(version=1))
    assert store.trusted_version("detect_detector") == 2


def test_state_survives_a_restart(store, keys, tmp_path):
    store.remember(store.verify_bundle_metadata(sign(bundle_meta(version=5), keys["bundle"][:2]), NOW))
    store.update_root(root_envelope(keys, version=2, signers=keys["root"]), NOW)
    again = TrustStore(tmp_path / "trust")
    assert again.root.version == 2 and again.trusted_version("detect_detector") == 5
    with pytest.raises(RollbackError):
        again.verify_bundle_metadata(sign(bundle_meta(version=4), keys["bundle"][:2]), NOW)
    assert sorted(p.name for p in (tmp_path / "trust").iterdir()) == ["root.json", "versions.json"]  # no tmp left


def test_corrupt_state_is_a_state_error(store, tmp_path):
    (tmp_path / "trust" / "versions.json").write_text("{not json")
    with pytest.raises(StateError):
        TrustStore(tmp_path / "trust")
    (tmp_path / "trust" / "versions.json").write_text('{"models": {"m": {"version": "x"}}}')
    with pytest.raises(StateError):
        TrustStore(tmp_path / "trust")


# --- root rotation ----------------------------------------------------------------------------------------

def test_rotation_signed_by_old_and_new_is_accepted(store, keys, tmp_path):
    v2 = root_envelope(keys, version=2, root="root2", bundle="bundle2", signers=keys["root"][:2] + keys["root2"][:2])
    assert store.update_root(v2, NOW)["version"] == 2
    assert TrustStore(tmp_path / "trust").root.version == 2
    meta = bundle_meta(version=1)
    assert store.verify_bundle_metadata(sign(meta, keys["bundle2"][:2]), NOW) == meta
    with pytest.raises(SignatureError):  # old bundle keys were removed by the new root
        store.verify_bundle_metadata(sign(meta, keys["bundle"][:2]), NOW)


def test_rotation_signed_only_by_new_keys_is_refused(store, keys):
    with pytest.raises(SignatureError, match="current root"):
        store.update_root(root_envelope(keys, version=2, root="root2", signers=keys["root2"]), NOW)
    with pytest.raises(SignatureError, match="its own root keys"):  # old keys only: new keys must sign too
        store.update_root(root_envelope(keys, version=2, root="root2", signers=keys["root"]), NOW)
    with pytest.raises(SignatureError):  # below the old threshold
        store.update_root(root_envelope(keys, version=2, root="root2", signers=keys["root"][:1] + keys["root2"]), NOW)
    assert store.root.version == 1


def test_rotation_versions_must_be_exactly_next(store, keys):
    both = keys["root"] + keys["root2"]
    with pytest.raises(TrustError, match="skips versions.*only v2"):
        store.update_root(root_envelope(keys, version=3, root="root2", signers=both), NOW)
    with pytest.raises(RollbackError):
        store.update_root(root_envelope(keys, version=1, root="root2", signers=both), NOW)
    with pytest.raises(ExpiredError):
        store.update_root(root_envelope(keys, version=2, root="root2", signers=both,
                                        expires=format_time(NOW - timedelta(days=1))), NOW)
    store.update_root(root_envelope(keys, version=2, root="root2", signers=both), NOW)
    with pytest.raises(SignatureError):  # v3 must now be signed by v2's root keys, not v1's
        store.update_root(root_envelope(keys, version=3, root="root", signers=keys["root"]), NOW)
    store.update_root(root_envelope(keys, version=3, root="root", signers=both), NOW)
    assert store.root.version == 3


def test_expires_in_is_utc_iso():
    text = expires_in(1, NOW)
    assert text == "2030-01-02T00:00:00Z"
