"""Bundles: one model version as ONE uncompressed tar file, checked against signed metadata before use.

Layout (members in this order; create_bundle writes them deterministically):
  metadata.json          a signed envelope (sidecar/trust.py) whose `signed` is
                         {"_type": "bundle", "version": int (per model name, only ever increasing),
                          "expires": ISO-8601 UTC, "model_name", "model_version": semver, "target",
                          "device_classes": {"built_for": [...], "verified_on": [...]} (builder.device_class),
                          "files": {relative path: {"sha256", "size", "delta" (optional)}},
                          "base": {"model_version"} (delta bundles), "config_pbtxt": text (optional),
                          "build_manifest": {...}, "expected_outputs": [{image_b64, boxes, scores, class_ids, name}],
                          "golden": {reference, images, criteria, counts} (sidecar/golden.py; optional)}
  files/<relative path>  one regular file per entry of `files` without a delta, relative to the Triton
                         model version folder
  deltas/<relative path> one sidecar.delta file per entry with a delta other than "unchanged"
                         (sidecar/bundle_delta.py: applied only on top of the device's file with the
                         stated base sha256, and the result must have the entry's sha256 and size)

verify_bundle reads metadata.json first (bounded), has the TrustStore check signatures, expiry and
rollback BEFORE anything is extracted, then streams each file into the staging folder while hashing it.
A member's size comes from its tar header, so one that is bigger than declared is refused before any of
its bytes is read; reads never go past the declared size. Any failure removes the staging folder.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder.device_class import ArtifactClasses
from builder.targets import TARGETS
from sidecar import delta as D
from sidecar.bundle_classes import bundle_classes, default_classes
from sidecar.bundle_delta import (CHUNK, DELTAS_PREFIX, FILES_PREFIX, UNCHANGED, check_delta_entries, delivery,
                                  file_digest, is_sha256, is_size, member_name, member_sha256, member_size,
                                  plan_deltas, rebuild, resolve_bases)
from sidecar.bundle_types import ExpectedOutput, VerifiedBundle, parse_expected_output
from sidecar.errors import BundleError, DiskSpaceError, SidecarError
from sidecar.trust import TrustStore, canonical_json, format_time, parse_time, sign

METADATA_NAME = "metadata.json"
MAX_METADATA_BYTES = 1 << 20
SKIPPED_DIRS = ("__pycache__",)  # interpreter caches are not part of a model version
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TAR_DEFAULTS = {"mtime": 0, "mode": 0o644, "uid": 0, "gid": 0, "uname": "", "gname": ""}


@dataclass(frozen=True)
class SignedBundle(VerifiedBundle):
    """A VerifiedBundle that also carries its verified `signed` metadata, for TrustStore.remember()."""

    signed: dict[str, Any] = field(default_factory=dict, repr=False)


# --- metadata checks shared by create and verify ------------------------------------------------------

def check_relative_path(rel: Any) -> str:
    """A plain relative POSIX path inside the version folder: no '..', '.', empty parts, '/', '\\' or NUL."""
    if (not isinstance(rel, str) or not rel or len(rel) > 1024 or rel.startswith("/") or "\\" in rel
            or "\0" in rel or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise BundleError(f"unsafe or malformed file path {rel!r:.120} (path traversal?)")
    return rel


def check_bundle_signed(signed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check the fields of bundle metadata beyond what the TrustStore checks; returns `files`."""
    if not isinstance(signed.get("model_name"), str) or not MODEL_NAME.match(signed["model_name"]):
        raise BundleError(f"model_name {signed.get('model_name')!r:.80} is not a Triton model name")
    if not isinstance(signed.get("model_version"), str) or not SEMVER.match(signed["model_version"]):
        raise BundleError(f"model_version {signed.get('model_version')!r:.80} is not a semantic version (1.2.0)")
    if signed.get("target") not in TARGETS:
        raise BundleError(f"target {signed.get('target')!r:.40} is not one of {', '.join(TARGETS)}")
    bundle_classes(signed)
    if signed.get("config_pbtxt") is not None and not isinstance(signed["config_pbtxt"], str):
        raise BundleError("config_pbtxt must be text")
    if not isinstance(signed.get("build_manifest", {}), dict):
        raise BundleError("build_manifest must be an object")
    if not isinstance(signed.get("expected_outputs", []), list):
        raise BundleError("expected_outputs must be a list")
    for item in signed.get("expected_outputs", []):
        parse_expected_output(item)
    if not isinstance(signed.get("golden", {}), dict):
        raise BundleError("golden (what made the expected outputs) must be an object")
    files = signed.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError("bundle metadata lists no files")
    for rel, entry in files.items():
        check_relative_path(rel)
        if not isinstance(entry, dict) or not is_sha256(entry.get("sha256")) or not is_size(entry.get("size")):
            raise BundleError(f"{rel}: file entry needs a lowercase hex sha256 and a size >= 0")
    folders = {rel.rsplit("/", 1)[0] for rel in files if "/" in rel}
    folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
    if clash := sorted(folders & files.keys()):
        raise BundleError(f"{clash[0]} is listed both as a file and as a folder")
    check_delta_entries(signed, files)
    return files


# --- create ---------------------------------------------------------------------------------------------

def _source_files(source_dir: Path) -> dict[str, Path]:
    """Regular files under source_dir by relative POSIX path; links and special files are refused."""
    if not source_dir.is_dir():
        raise BundleError(f"{source_dir} is not a folder")
    found: dict[str, Path] = {}
    for folder, dirs, names in os.walk(source_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        for name in dirs + names:
            path = Path(folder) / name
            if path.is_symlink():
                raise BundleError(f"{path} is a symbolic link: bundles carry regular files only")
        for name in names:
            path = Path(folder) / name
            if not path.is_file():
                raise BundleError(f"{path} is not a regular file")
            found[check_relative_path(path.relative_to(source_dir).as_posix())] = path
    if not found:
        raise BundleError(f"{source_dir} holds no files")
    return dict(sorted(found.items()))


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    for key, value in _TAR_DEFAULTS.items():
        setattr(info, key, value)
    return info


def create_bundle(source_dir: Path, out: Path, *, model_name: str, model_version: str, target: str,
                  metadata_version: int, keys: Sequence[Ed25519PrivateKey], expires: datetime | str,
                  config_pbtxt: str | None = None, build_manifest: Mapping[str, Any] | None = None,
                  expected_outputs: Iterable[ExpectedOutput | Mapping[str, Any]] = (),
                  base_dir: Path | None = None, base_model_version: str | None = None,
                  delta_methods: Iterable[str] = D.ALL,
                  device_classes: ArtifactClasses | None = None, golden: Mapping[str, Any] | None = None) -> Path:
    """Sign and write the bundle of one model version folder; the same inputs give the same bytes.

    With base_dir (the base version's folder, as built) and base_model_version, a delta bundle: files equal
    to the base's travel as "unchanged", changed ones as the smallest verifying delta (sidecar.bundle_delta).
    Members are sorted with fixed mtime/uid/gid/mode, Ed25519 signatures are deterministic, and `out` is
    replaced atomically. The folder must not change while it is bundled (files are read twice).
    device_classes: what the model is built and verified for (default_classes when None).
    golden: what made the expected outputs (sidecar.golden.make_golden_set's record), signed with them.
    """
    source_dir, out = Path(source_dir), Path(out)
    if isinstance(metadata_version, bool) or not isinstance(metadata_version, int) or metadata_version < 1:
        raise BundleError(f"metadata_version must be a positive integer, not {metadata_version!r}")
    if (base_dir is None) != (base_model_version is None):
        raise BundleError("a delta bundle needs both the base folder and the base's model version")
    if base_model_version is not None and not SEMVER.match(base_model_version):
        raise BundleError(f"base model version {base_model_version!r:.80} is not a semantic version (1.2.0)")
    delta_methods = tuple(delta_methods)
    if unknown := sorted(set(delta_methods) - set(D.ALL)):
        raise BundleError(f"unknown delta method(s) {', '.join(unknown)}; known: {', '.join(D.ALL)}")
    sources = _source_files(source_dir)
    files: dict[str, dict[str, Any]] = {}
    for rel, path in sources.items():
        digest, size = file_digest(path)
        files[rel] = {"sha256": digest, "size": size}
    payloads = plan_deltas(files, sources, Path(base_dir), delta_methods) if base_dir is not None else {}
    signed: dict[str, Any] = {
        "_type": "bundle", "version": metadata_version,
        "expires": format_time(expires) if isinstance(expires, datetime) else expires,
        "model_name": model_name, "model_version": model_version, "target": target, "files": files,
        "build_manifest": dict(build_manifest or {}),
        "expected_outputs": [dataclasses.asdict(e) if isinstance(e, ExpectedOutput) else dict(e)
                             for e in expected_outputs],
    }
    if target not in TARGETS:
        raise BundleError(f"target {target!r:.40} is not one of {', '.join(TARGETS)}")
    classes = device_classes or default_classes(target, sources, build_manifest)
    signed["device_classes"] = classes.to_dict()
    if golden is not None:
        signed["golden"] = dict(golden)
    if config_pbtxt is not None:
        signed["config_pbtxt"] = config_pbtxt
    if base_model_version is not None:
        signed["base"] = {"model_version": base_model_version}
    parse_time(signed["expires"])
    check_bundle_signed(signed)
    metadata = canonical_json(sign(signed, keys))
    if len(metadata) > MAX_METADATA_BYTES:
        raise BundleError(f"metadata.json would be {len(metadata)} bytes; devices accept {MAX_METADATA_BYTES} "
                          "(fewer or smaller expected_outputs images?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tar_info(METADATA_NAME, len(metadata)), io.BytesIO(metadata))
                for rel, path in sources.items():
                    name = member_name(rel, files[rel])
                    if name is None:
                        continue
                    if rel in payloads:
                        tar.addfile(_tar_info(name, len(payloads[rel])), io.BytesIO(payloads[rel]))
                        continue
                    with open(path, "rb") as f:
                        tar.addfile(_tar_info(name, files[rel]["size"]), f)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# --- verify ---------------------------------------------------------------------------------------------

def _open_bundle(path: Path) -> BinaryIO:
    """The one place the bundle file is opened (tests wrap it to count the bytes read)."""
    return open(path, "rb")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise BundleError("metadata.json repeats a key (ambiguous JSON is refused)")
    return dict(pairs)


def _is_regular(member: tarfile.TarInfo) -> bool:
    return member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()


def _read_metadata(tar: tarfile.TarFile, max_bytes: int) -> Any:
    first = tar.next()
    if first is None or first.name != METADATA_NAME:
        raise BundleError(f"the first member must be {METADATA_NAME}, found {first.name if first else 'nothing'!r:.120}")
    if not _is_regular(first):
        raise BundleError(f"{METADATA_NAME} is not a regular file")
    if first.size > max_bytes:
        raise BundleError(f"{METADATA_NAME} is {first.size} bytes, more than the {max_bytes} allowed")
    data = tar.extractfile(first).read(first.size)
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{METADATA_NAME} is not valid UTF-8 JSON: {exc}") from exc


def _check_space(staging: Path, needed: int) -> None:
    probe = staging
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(f"staging needs {needed} bytes, {free} free under {probe}")


def _stream_member(tar: tarfile.TarFile, member: tarfile.TarInfo, size: int, target: Path) -> str:
    """Copy exactly `size` bytes into a new file at target while hashing; never reads beyond `size`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, copied = hashlib.sha256(), 0
    src = tar.extractfile(member)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as dst:
        while copied < size:
            block = src.read(min(CHUNK, size - copied))
            if not block:
                raise BundleError(f"{member.name}: truncated after {copied} of {size} bytes")
            digest.update(block)
            dst.write(block)
            copied += len(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, size: int) -> bytes:
    """Exactly `size` bytes of a member into memory (delta payloads); never reads beyond `size`."""
    data = tar.extractfile(member).read(size)
    if len(data) != size:
        raise BundleError(f"{member.name}: truncated after {len(data)} of {size} bytes")
    return data


def _extract(tar: tarfile.TarFile, files: Mapping[str, Mapping[str, Any]], staging: Path,
             bases: Mapping[str, Path]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    by_member = {name: rel for rel, entry in files.items() if (name := member_name(rel, entry))}
    for member in iter(tar.next, None):
        if member.name == METADATA_NAME:
            raise BundleError(f"{METADATA_NAME} appears more than once")
        if not member.name.startswith((FILES_PREFIX, DELTAS_PREFIX)):
            raise BundleError(f"unexpected member {member.name!r:.120}: only {FILES_PREFIX}... and "
                              f"{DELTAS_PREFIX}... may follow {METADATA_NAME}")
        check_relative_path(member.name.split("/", 1)[1])
        if not _is_regular(member):
            raise BundleError(f"{member.name}: not a regular file (links, devices and folders are refused)")
        rel = by_member.get(member.name)
        if rel is None:
            raise BundleError(f"{member.name} is not listed in the signed metadata (or not as a "
                              f"{'delta' if member.name.startswith(DELTAS_PREFIX) else 'full file'})")
        if rel in hashes:
            raise BundleError(f"{member.name} appears more than once")
        entry, declared = files[rel], member_size(files[rel])
        if member.size != declared:
            raise BundleError(f"{member.name}: {member.size} bytes in the bundle, {declared} in the signed metadata")
        if entry.get("delta"):
            payload = _read_member(tar, member, declared)
            if hashlib.sha256(payload).hexdigest() != member_sha256(entry):
                raise BundleError(f"{member.name}: sha256 differs from the signed delta's (corrupt or tampered)")
            hashes[rel] = rebuild(rel, entry, bases[rel], payload, staging / rel)
            continue
        hashes[rel] = _stream_member(tar, member, declared, staging / rel)
        if hashes[rel] != files[rel]["sha256"]:
            raise BundleError(f"{rel}: sha256 {hashes[rel][:16]}... differs from the signed "
                              f"{files[rel]['sha256'][:16]}... (corrupt or tampered)")
    for rel, entry in files.items():
        if (entry.get("delta") or {}).get("method") == UNCHANGED:
            hashes[rel] = rebuild(rel, entry, bases[rel], None, staging / rel)
    if missing := sorted(files.keys() - hashes.keys()):
        raise BundleError(f"listed file(s) missing from the bundle: {', '.join(missing[:5])}")
    return hashes


def read_signed_unverified(path: Path) -> dict[str, Any]:
    """The `signed` part of a bundle's metadata WITHOUT checking anything: for display (bundle create)."""
    try:
        with _open_bundle(Path(path)) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            envelope = _read_metadata(tar, MAX_METADATA_BYTES)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable bundle ({exc})") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise BundleError(f"{path}: metadata.json is not a signed envelope")
    return envelope["signed"]


def verify_bundle(path: Path, trust: TrustStore, staging: Path, *, base_dirs: Sequence[Path] = (),
                  now: datetime | None = None, max_metadata_bytes: int = MAX_METADATA_BYTES,
                  accept: Callable[[Mapping[str, Any]], None] | None = None) -> SignedBundle:
    """Verify a bundle and stage its files in `staging` (absent or empty; created). On any error the staging
    folder is removed and a SidecarError (BundleError, TrustError..., DiskSpaceError) is raised. Nothing in
    staging is trusted until this returns. The trusted versions are not updated: after a successful install
    the agent calls trust.remember(result.signed).

    base_dirs: verified version folders a delta bundle may build on (the device's committed versions, newest
    first); every base a delta needs is found before anything is extracted.
    accept: called with the trusted, checked metadata before anything is extracted; raises to refuse the
    bundle (the agent's target and device-class checks)."""
    path, staging = Path(path), Path(staging)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise BundleError(f"staging folder {staging} must be absent or empty")
    try:
        with _open_bundle(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            signed = trust.verify_bundle_metadata(_read_metadata(tar, max_metadata_bytes), now)
            files = check_bundle_signed(signed)
            if accept is not None:
                accept(signed)
            bases = resolve_bases(signed, files, base_dirs)
            _check_space(staging, sum(entry["size"] for entry in files.values()))
            staging.mkdir(parents=True, exist_ok=True)
            hashes = _extract(tar, files, staging, bases)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, SidecarError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskSpaceError(f"disk full while staging {path.name}: {exc}") from exc
        if isinstance(exc, (tarfile.TarError, OSError, EOFError)):
            raise BundleError(f"{path}: not a readable bundle ({exc})") from exc
        raise
    return SignedBundle(
        model_name=signed["model_name"], version=signed["model_version"], target=signed["target"],
        metadata_version=signed["version"], files={rel: staging / rel for rel in sorted(hashes)},
        file_hashes=dict(sorted(hashes.items())), config_pbtxt=signed.get("config_pbtxt"),
        build_manifest=signed.get("build_manifest", {}), base_version=(signed.get("base") or {}).get("model_version"),
        delivery=delivery(files), device_classes=signed["device_classes"],
        expected_outputs=tuple(parse_expected_output(e) for e in signed.get("expected_outputs", [])), signed=signed)
