"""Signed metadata and the device's trust state: a compact form of The Update Framework (TUF).

Two roles, both threshold-signed with Ed25519 (keys, key ids and key files: sidecar/keys.py):
  root    signs root metadata: which keys exist and which keys (and how many) each role needs.
  bundle  signs bundle metadata: one model version's files, hashes and checks (see sidecar/bundle.py).

Envelope: {"signed": {...}, "signatures": [{"keyid": hex, "sig": hex}, ...]}. A signature is over the
canonical JSON of `signed` (sorted keys, compact separators, UTF-8, no NaN), so whitespace or key order of
the file never matters. A keyid is the sha256 of the raw 32-byte public key, and a root's `keys` must use
exactly those ids, so one key can never be counted twice under two names.

Here: metadata times and expiry, signing and threshold verification of envelopes, root metadata (Root,
rotation) and TrustStore, the device's persisted newest root and per-model version floors.

Defended (TUF's names): arbitrary software (bundle-role threshold), key compromise (thresholds; root rotation
signed by the old AND the new root keys), freeze (expired bundle metadata or trusted root: ExpiredError),
rollback/replay (older than the newest installed version of that model, or that version with different
content: RollbackError). Not covered: mix-and-match across models (no snapshot role), an attacker who can
write the store's folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.durable import atomic_write
from sidecar.errors import ExpiredError, RollbackError, SignatureError, StateError, TrustError
from sidecar.keys import AnyKey, key_id, public_from_hex, public_hex

log = logging.getLogger(__name__)

ROOT_ROLE = "root"
BUNDLE_ROLE = "bundle"
ROLES = (ROOT_ROLE, BUNDLE_ROLE)
ROOT_FILE = "root.json"
VERSIONS_FILE = "versions.json"
VERSIONS_FORMAT = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


# --- time -----------------------------------------------------------------------------------------------

def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is needed")
    return moment.astimezone(timezone.utc).strftime(TIME_FORMAT)


def expires_in(days: float, now: datetime | None = None) -> str:
    return format_time((now or utc_now()) + timedelta(days=days))


def parse_time(text: Any) -> datetime:
    """ISO-8601 with an explicit UTC offset ("2027-01-31T00:00:00Z"); a time without one is refused."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise TrustError(f"expires is not an ISO-8601 time: {text!r:.60}") from exc
    if moment.tzinfo is None:
        raise TrustError(f"expires has no timezone (write it in UTC, ending in Z): {text!r:.60}")
    return moment.astimezone(timezone.utc)


def check_expiry(signed: Mapping[str, Any], now: datetime | None = None, what: str = "metadata") -> None:
    expires, now = parse_time(signed.get("expires")), now or utc_now()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if now >= expires:
        raise ExpiredError(f"{what} expired at {format_time(expires)}: refusing it (possible freeze attack: "
                           "someone may be replaying old metadata to keep this device on an old version)")


# --- envelopes ------------------------------------------------------------------------------------------

def canonical_json(data: Any) -> bytes:
    """The signed bytes: sorted keys, no whitespace, UTF-8, NaN/inf refused."""
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TrustError(f"metadata is not plain JSON: {exc}") from exc


def sign(signed: dict, keys: Iterable[Ed25519PrivateKey]) -> dict:
    """Envelope with one signature per distinct key, sorted by keyid (deterministic: Ed25519 is)."""
    if not isinstance(signed, dict):
        raise TrustError("signed metadata must be a JSON object")
    message = canonical_json(signed)
    by_id = {key_id(k): k for k in keys}
    if not by_id:
        raise TrustError("no signing keys given")
    return {"signed": signed,
            "signatures": [{"keyid": kid, "sig": by_id[kid].sign(message).hex()} for kid in sorted(by_id)]}


def _short(keyids: Iterable[str]) -> str:
    return ", ".join(k[:12] for k in sorted(keyids))


def verify(envelope: Any, keys: Mapping[str, Ed25519PublicKey], threshold: int) -> dict:
    """The `signed` part when at least `threshold` distinct trusted keys signed it validly; else SignatureError.

    Signatures by keys outside `keys` are ignored (logged, and named in the error); a bad signature by a
    trusted key does not count; several signatures by one key count once.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise SignatureError('not a signed envelope: expected {"signed": {...}, "signatures": [...]}')
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list):
        raise SignatureError("signed envelope has no signatures list")
    message = canonical_json(envelope["signed"])
    valid, unknown, invalid = set(), set(), set()
    for entry in signatures:
        kid = entry.get("keyid") if isinstance(entry, dict) else None
        sig = entry.get("sig") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not isinstance(sig, str):
            raise SignatureError("malformed signature entry (needs string keyid and sig)")
        if kid not in keys:
            unknown.add(kid)
            continue
        try:
            keys[kid].verify(bytes.fromhex(sig), message)
            valid.add(kid)
        except (InvalidSignature, ValueError):
            invalid.add(kid)
    invalid -= valid
    notes = []
    if unknown:
        notes.append(f"ignored {len(unknown)} signature(s) by unknown key(s) {_short(unknown)}")
    if invalid:
        notes.append(f"{len(invalid)} invalid signature(s) by trusted key(s) {_short(invalid)}")
    if len(valid) < threshold:
        detail = f" ({'; '.join(notes)})" if notes else ""
        raise SignatureError(f"{len(valid)} valid signature{'s' if len(valid) != 1 else ''} from trusted keys, "
                             f"{threshold} needed{detail}")
    if notes:
        log.info("signature check passed with %d of %d needed; %s", len(valid), threshold, "; ".join(notes))
    return envelope["signed"]


# --- root metadata --------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_root(*, version: int, expires: datetime | str, root_keys: Sequence[AnyKey], root_threshold: int,
              bundle_keys: Sequence[AnyKey], bundle_threshold: int) -> dict:
    """The `signed` part of a root (sign it with sign(root, root_private_keys))."""
    roles = {ROOT_ROLE: (root_keys, root_threshold), BUNDLE_ROLE: (bundle_keys, bundle_threshold)}
    signed = {"_type": "root", "version": version,
              "expires": format_time(expires) if isinstance(expires, datetime) else expires,
              "keys": {key_id(k): public_hex(k) for keys, _ in roles.values() for k in keys},
              "roles": {name: {"keyids": sorted({key_id(k) for k in keys}), "threshold": threshold}
                        for name, (keys, threshold) in roles.items()}}
    Root.from_signed(signed)  # refuse what no device would accept
    return signed


@dataclass(frozen=True)
class Role:
    keyids: frozenset[str]
    threshold: int


@dataclass(frozen=True)
class Root:
    """Parsed, checked root metadata (signatures are checked separately)."""

    version: int
    expires: datetime
    keys: dict[str, Ed25519PublicKey]
    roles: dict[str, Role]
    signed: dict

    @classmethod
    def from_signed(cls, signed: Any) -> "Root":
        if not isinstance(signed, dict) or signed.get("_type") != "root":
            raise TrustError('not root metadata (_type must be "root")')
        version = signed.get("version")
        if not _is_int(version) or version < 1:
            raise TrustError(f"root version must be a positive integer, not {version!r}")
        raw_keys, raw_roles = signed.get("keys"), signed.get("roles")
        if not isinstance(raw_keys, dict) or not isinstance(raw_roles, dict):
            raise TrustError("root needs a keys object and a roles object")
        keys = {}
        for kid, hex_key in raw_keys.items():
            keys[kid] = public_from_hex(hex_key)
            if key_id(keys[kid]) != kid:
                raise TrustError(f"root lists key {kid[:12]} under an id that is not the sha256 of the key")
        roles = {}
        for name in ROLES:
            role = raw_roles.get(name)
            if (not isinstance(role, dict) or not isinstance(role.get("keyids"), list)
                    or not all(isinstance(k, str) for k in role["keyids"])):
                raise TrustError(f"root has no {name!r} role with a keyids list of strings")
            keyids, threshold = frozenset(role["keyids"]), role.get("threshold")
            if not keyids <= keys.keys():
                raise TrustError(f"root role {name!r} names keys the root does not list")
            if not _is_int(threshold) or not 1 <= threshold <= len(keyids):
                raise TrustError(f"root role {name!r}: threshold {threshold!r} must be between 1 and its "
                                 f"{len(keyids)} key(s)")
            roles[name] = Role(keyids, threshold)
        return cls(version, parse_time(signed.get("expires")), keys, roles, signed)

    def role_keys(self, role: str) -> dict[str, Ed25519PublicKey]:
        return {kid: self.keys[kid] for kid in self.roles[role].keyids}

    def verify_role(self, envelope: Any, role: str) -> dict:
        return verify(envelope, self.role_keys(role), self.roles[role].threshold)


def verify_root_self_signed(envelope: Any) -> Root:
    """A root signed by the threshold of its own root-role keys (trust on first use)."""
    root = Root.from_signed(envelope.get("signed") if isinstance(envelope, dict) else None)
    root.verify_role(envelope, ROOT_ROLE)
    return root


def verify_root_update(current: Root, new_envelope: Any, now: datetime | None = None) -> Root:
    """TUF root rotation: new root signed by the current root's root threshold AND its own, version exactly
    current + 1 (intermediate roots are not fetched or chained: apply each version in turn), not expired."""
    try:
        current.verify_role(new_envelope, ROOT_ROLE)
    except SignatureError as exc:
        raise SignatureError(f"new root is not signed by the current root's keys (v{current.version}): {exc}") from exc
    new = Root.from_signed(new_envelope["signed"])
    try:
        new.verify_role(new_envelope, ROOT_ROLE)
    except SignatureError as exc:
        raise SignatureError(f"new root v{new.version} is not signed by its own root keys: {exc}") from exc
    if new.version <= current.version:
        raise RollbackError(f"root v{new.version} is not newer than the trusted root v{current.version} "
                            "(rollback attack?)")
    if new.version != current.version + 1:
        raise TrustError(f"root v{new.version} skips versions: the trusted root is v{current.version}, so only "
                         f"v{current.version + 1} is accepted next (apply each root version in order)")
    check_expiry(new.signed, now, f"root v{new.version}")
    return new


# --- the device's trust state ----------------------------------------------------------------------------

def metadata_sha256(signed: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(signed)).hexdigest()


class TrustStore:
    """The newest trusted root (root.json) and, per model name, the newest installed bundle-metadata version
    (versions.json) in `folder`. One process owns a folder; there is no locking.

    Verifying and remembering are split on purpose: verify_bundle_metadata() only checks, and the agent
    calls remember(signed) after the version is installed and healthy. A bundle that verifies but fails its
    install or health gate therefore does not raise the floor, and the device can keep or retry the old one.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._root: Root | None = None
        self._versions: dict[str, dict[str, Any]] = {}
        root_path, versions_path = self.folder / ROOT_FILE, self.folder / VERSIONS_FILE
        if root_path.exists():
            try:
                self._root = verify_root_self_signed(self._read(root_path))
            except TrustError as exc:
                raise StateError(f"{root_path}: stored root no longer verifies: {exc}") from exc
        if versions_path.exists():
            data = self._read(versions_path)
            models = data.get("models") if isinstance(data, dict) else None
            if not isinstance(models, dict) or not all(
                    isinstance(v, dict) and _is_int(v.get("version")) and isinstance(v.get("sha256"), str)
                    for v in models.values()):
                raise StateError(f"{versions_path}: not a versions file ({{'models': {{name: {{version, sha256}}}}}})")
            self._versions = models

    @staticmethod
    def _read(path: Path) -> Any:
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable ({exc})") from exc

    @property
    def initialized(self) -> bool:
        return self._root is not None

    @property
    def root(self) -> Root:
        if self._root is None:
            raise TrustError(f"trust store {self.folder} has no root yet: initialize it with the device image's root.json")
        return self._root

    def trusted_version(self, model_name: str) -> int | None:
        entry = self._versions.get(model_name)
        return entry["version"] if entry else None

    def _write(self, name: str, data: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / name, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

    def initialize(self, root_envelope: dict) -> dict:
        """Trust on first use: accept a root signed by its own root threshold (expiry is not checked here: the
        image may be older than its root; bundles are refused while the trusted root is expired)."""
        root = verify_root_self_signed(root_envelope)
        if self._root is not None:
            if metadata_sha256(self._root.signed) == metadata_sha256(root.signed):
                return root.signed
            raise TrustError(f"trust store {self.folder} already trusts root v{self._root.version}; "
                             "use update_root to rotate")
        self._write(ROOT_FILE, root_envelope)
        self._root = root
        return root.signed

    def update_root(self, new_envelope: dict, now: datetime | None = None) -> dict:
        """Rotate to root version current+1 (see verify_root_update); persisted before it returns."""
        new = verify_root_update(self.root, new_envelope, now)
        self._write(ROOT_FILE, new_envelope)
        self._root = new
        log.info("trusted root rotated to v%d", new.version)
        return new.signed

    def verify_bundle_metadata(self, envelope: Any, now: datetime | None = None) -> dict:
        """The `signed` part of bundle metadata, checked for signatures, freeze and rollback. Nothing is stored."""
        root = self.root
        check_expiry(root.signed, now, f"trusted root v{root.version}")
        signed = root.verify_role(envelope, BUNDLE_ROLE)
        if signed.get("_type") != "bundle":
            raise TrustError('not bundle metadata (_type must be "bundle")')
        name, version = signed.get("model_name"), signed.get("version")
        if not isinstance(name, str) or not name:
            raise TrustError("bundle metadata has no model_name")
        if not _is_int(version) or version < 1:
            raise TrustError(f"bundle metadata version must be a positive integer, not {version!r}")
        check_expiry(signed, now, f"bundle metadata v{version} of {name}")
        self._check_floor(name, version, metadata_sha256(signed))
        return signed

    def _check_floor(self, name: str, version: int, digest: str) -> None:
        entry = self._versions.get(name)
        if entry is not None and version < entry["version"]:
            raise RollbackError(f"{name}: metadata v{version} is older than the installed v{entry['version']} "
                                "(rollback attack?)")
        if entry is not None and version == entry["version"] and digest != entry["sha256"]:
            raise RollbackError(f"{name}: metadata v{version} differs from the v{version} already installed; "
                                "new content needs a new version (replay or mix-up?)")

    def remember(self, signed: Mapping[str, Any]) -> None:
        """Record `signed` (from verify_bundle_metadata) as installed: the new floor for its model name."""
        name, version, digest = signed["model_name"], signed["version"], metadata_sha256(signed)
        self._check_floor(name, version, digest)
        versions = {**self._versions, name: {"version": version, "sha256": digest}}
        self._write(VERSIONS_FILE, {"format": VERSIONS_FORMAT, "models": versions})
        self._versions = versions
