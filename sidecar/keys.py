"""Ed25519 signing keys: generation, key ids, raw hex public keys and PEM files.

A keyid is the sha256 of the raw 32-byte public key (what root metadata lists, see sidecar/trust.py); a
private key given where a public one is expected is reduced to its public half. Private keys are stored
as unencrypted PKCS#8 PEM with mode 0600, public keys as SubjectPublicKeyInfo PEM.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.errors import TrustError

AnyKey = Union[Ed25519PrivateKey, Ed25519PublicKey]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _public(key: AnyKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def public_hex(key: AnyKey) -> str:
    """The raw 32-byte public key as hex (what root metadata lists)."""
    return _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(public_key: AnyKey) -> str:
    """sha256 hex of the raw public key bytes (a private key is reduced to its public half)."""
    return hashlib.sha256(bytes.fromhex(public_hex(public_key))).hexdigest()


def public_from_hex(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not an Ed25519 public key: {text!r:.80}") from exc


def save_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> Path:
    """Unencrypted PKCS#8 PEM, created with mode 0600 (never world- or group-readable, even briefly)."""
    path = Path(path)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _load_pem(path: Path, kind: type, private: bool):
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"{path}: not a readable unencrypted PEM key ({exc})") from exc
    if not isinstance(key, kind):
        raise TrustError(f"{path}: not an {kind.__name__}")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return _load_pem(path, Ed25519PrivateKey, private=True)


def save_public_key(key: AnyKey, path: Path) -> Path:
    Path(path).write_bytes(_public(key).public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return Path(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_pem(path, Ed25519PublicKey, private=False)
