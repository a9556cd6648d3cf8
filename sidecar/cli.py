"""`edgestack keys` and `edgestack bundle`: make signing keys and root metadata, rotate them, sign bundles.

Key folder layout (written by `keys init`, read by `keys rotate` and `bundle create`):
  root-1.pem ... root-N.pem       root-role private keys (0600): keep them offline, they sign root.json only
  bundle-1.pem ... bundle-M.pem   bundle-role private keys (0600): the build machine signs bundles with these
  root.json                       the signed root metadata: ship it in the device image (TrustStore.initialize)

cryptography is imported only when a command runs, so the rest of `edgestack` works without it. Errors are
reported by edgestack.cli.main.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from builder.targets import TARGETS
from sidecar.delta import ALL as DELTA_METHODS
from sidecar.errors import SidecarError
from sidecar.golden_cli import add_bundle_create_options, add_golden_parser, bundle_expected

ROOT_JSON = "root.json"


def _signing(func):
    """The handler of a command that signs or verifies: refused with a SidecarError without cryptography."""
    def run(args: argparse.Namespace) -> int:
        try:
            import cryptography  # noqa: F401
        except ImportError as exc:
            raise SidecarError(f"the sidecar needs the 'cryptography' package ({exc})") from exc
        return func(args)
    return run


def _json_file(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SidecarError(f"cannot read {what} {path}: {exc}") from exc


def _load_keys(folder: Path, prefix: str) -> list:
    from sidecar.keys import load_private_key

    return [load_private_key(p) for p in sorted(folder.glob(f"{prefix}-*.pem"))]


def _new_key_folder(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise SidecarError(f"{folder} is not empty: refusing to overwrite keys (use a new folder)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def _write_keys(folder: Path, prefix: str, keys: list) -> None:
    from sidecar.keys import key_id, save_private_key

    for i, key in enumerate(keys, start=1):
        save_private_key(key, folder / f"{prefix}-{i}.pem")
        print(f"  {prefix}-{i}.pem  keyid {key_id(key)}")


def _write_root(folder: Path, envelope: dict) -> Path:
    path = folder / ROOT_JSON
    path.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _check_counts(args: argparse.Namespace) -> None:
    for role in ("root", "bundle"):
        count, threshold = getattr(args, f"{role}_keys"), getattr(args, f"{role}_threshold")
        if not 1 <= threshold <= count:
            raise SidecarError(f"--{role}-threshold {threshold} must be between 1 and --{role}-keys {count}")


def cmd_keys_init(args: argparse.Namespace) -> int:
    from sidecar.keys import generate_key
    from sidecar.trust import expires_in, make_root, sign, verify_root_self_signed

    _check_counts(args)
    folder = Path(args.dir)
    _new_key_folder(folder)
    root_keys = [generate_key() for _ in range(args.root_keys)]
    bundle_keys = [generate_key() for _ in range(args.bundle_keys)]
    print(f"keys written to {folder}:")
    _write_keys(folder, "root", root_keys)
    _write_keys(folder, "bundle", bundle_keys)
    signed = make_root(version=1, expires=expires_in(args.expires_days), root_keys=root_keys,
                       root_threshold=args.root_threshold, bundle_keys=bundle_keys,
                       bundle_threshold=args.bundle_threshold)
    envelope = sign(signed, root_keys)
    verify_root_self_signed(envelope)
    path = _write_root(folder, envelope)
    print(f"root v1 (expires {signed['expires']}) written to {path}: ship it in the device image;\n"
          f"move the root-*.pem files offline, they are needed only to rotate keys")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from sidecar.keys import generate_key, key_id
    from sidecar.trust import (BUNDLE_ROLE, ROOT_ROLE, expires_in, make_root, sign, verify_root_self_signed,
                               verify_root_update)

    _check_counts(args)
    old_dir, new_dir = Path(args.dir), Path(args.new_dir)
    current = verify_root_self_signed(_json_file(str(old_dir / ROOT_JSON), "current root"))
    old_root_keys = [k for k in _load_keys(old_dir, "root") if key_id(k) in current.roles[ROOT_ROLE].keyids]
    if len(old_root_keys) < current.roles[ROOT_ROLE].threshold:
        raise SidecarError(f"{old_dir} holds {len(old_root_keys)} of the current root's keys; its threshold is "
                           f"{current.roles[ROOT_ROLE].threshold}")
    if args.keep_bundle_keys:
        bundle_keys = [k for k in _load_keys(old_dir, "bundle") if key_id(k) in current.roles[BUNDLE_ROLE].keyids]
        if not bundle_keys:
            raise SidecarError(f"--keep-bundle-keys: no bundle-*.pem of the current root in {old_dir}")
        args.bundle_keys = len(bundle_keys)
        args.bundle_threshold = min(args.bundle_threshold, len(bundle_keys))
    else:
        bundle_keys = [generate_key() for _ in range(args.bundle_keys)]
    root_keys = [generate_key() for _ in range(args.root_keys)]
    _new_key_folder(new_dir)
    print(f"keys written to {new_dir}:")
    _write_keys(new_dir, "root", root_keys)
    _write_keys(new_dir, "bundle", bundle_keys)
    signed = make_root(version=current.version + 1, expires=expires_in(args.expires_days), root_keys=root_keys,
                       root_threshold=args.root_threshold, bundle_keys=bundle_keys,
                       bundle_threshold=args.bundle_threshold)
    envelope = sign(signed, old_root_keys + root_keys)
    verify_root_update(current, envelope)
    path = _write_root(new_dir, envelope)
    kept = "bundle keys are kept" if args.keep_bundle_keys else "bundles signed by the old bundle keys are refused after it"
    print(f"root v{signed['version']} signed by the old and the new root keys written to {path}: deliver it to "
          f"devices (TrustStore.update_root); {kept}")
    return 0


def _artifact_classes(built_for: list[str] | None, verified_on: list[str] | None):
    """--device-class / --verified-on as ArtifactClasses; None (the manifest's or the target's) when not given."""
    from builder.device_class import ArtifactClasses

    if not built_for:
        if verified_on:
            raise SidecarError("--verified-on needs --device-class")
        return None
    return ArtifactClasses(tuple(built_for), tuple(verified_on or ()))


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from sidecar.bundle import create_bundle, read_signed_unverified
    from sidecar.keys import key_id
    from sidecar.trust import BUNDLE_ROLE, expires_in, verify_root_self_signed

    key_dir = Path(args.keys)
    keys = _load_keys(key_dir, "bundle")
    if not keys:
        raise SidecarError(f"no bundle-*.pem keys in {key_dir}")
    if (key_dir / ROOT_JSON).exists():  # refuse a bundle the devices would refuse
        role = verify_root_self_signed(_json_file(str(key_dir / ROOT_JSON), "root")).roles[BUNDLE_ROLE]
        keys = [k for k in keys if key_id(k) in role.keyids]
        if len(keys) < role.threshold:
            raise SidecarError(f"{key_dir} holds {len(keys)} of the root's bundle keys; {role.threshold} needed")
    manifest = _json_file(args.build_manifest, "build manifest") if args.build_manifest else None
    if manifest is None:
        from sidecar.bundle_classes import repository_variant_manifest

        manifest = repository_variant_manifest(Path(args.model_version_dir), args.model_name)
        if manifest is not None:
            print(f"build manifest: the variant {manifest.get('variant', {}).get('name')} this repository serves "
                  f"(device classes {', '.join(manifest.get('device_classes', {}).get('built_for', [])) or 'unstated'})")
    if manifest is not None and "manifest_sha256" in manifest:
        from builder.optimize.manifest import manifest_sha256

        if manifest_sha256(manifest) != manifest["manifest_sha256"]:
            raise SidecarError(f"{args.build_manifest or 'the variant manifest'}: manifest_sha256 does not match its "
                               "content")
    config = Path(args.config).read_text(encoding="utf-8") if args.config else None
    expected, golden = bundle_expected(args, _json_file)
    if (args.base is None) != (args.base_version is None):
        raise SidecarError("a delta bundle needs both --base and --base-version")
    out = create_bundle(Path(args.model_version_dir), Path(args.out), model_name=args.model_name,
                        model_version=args.model_version, target=args.target,
                        metadata_version=args.metadata_version, keys=keys, expires=expires_in(args.expires_days),
                        config_pbtxt=config, build_manifest=manifest, expected_outputs=expected,
                        base_dir=Path(args.base) if args.base else None, base_model_version=args.base_version,
                        delta_methods=args.delta_methods.split(","),
                        device_classes=_artifact_classes(args.device_class, args.verified_on), golden=golden)
    kind = f"delta against {args.base_version}" if args.base else "full"
    print(f"bundle {args.model_name} {args.model_version} ({kind}, metadata v{args.metadata_version}, {args.target}, "
          f"signed by {len(keys)} key(s)) written to {out} ({out.stat().st_size:,} bytes)")
    if args.base:
        for rel, entry in read_signed_unverified(out)["files"].items():
            delta = entry.get("delta") or {}
            shipped = "0" if delta.get("method") == "unchanged" else f"{delta.get('size', entry['size']):,}"
            print(f"  {rel}: {delta.get('method', 'full')}, {shipped} of {entry['size']:,} bytes")
    return 0


def _role_options(parser: argparse.ArgumentParser, expires_days: int) -> None:
    parser.add_argument("--root-keys", type=int, default=1, metavar="N", help="root-role keys to generate (default 1)")
    parser.add_argument("--root-threshold", type=int, default=1, metavar="T",
                        help="root-role signatures a new root needs (default 1)")
    parser.add_argument("--bundle-keys", type=int, default=1, metavar="N", help="bundle-role keys to generate (default 1)")
    parser.add_argument("--bundle-threshold", type=int, default=1, metavar="T",
                        help="bundle-role signatures a bundle needs (default 1)")
    parser.add_argument("--expires-days", type=float, default=expires_days, metavar="D",
                        help=f"the root expires after D days (default {expires_days}); devices refuse bundles "
                             "while their trusted root is expired")


def add_parser(subparsers) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Register `keys` (init, rotate) and `bundle` (create) on an argparse subparsers object."""
    keys = subparsers.add_parser(
        "keys", help="make Ed25519 signing keys and the signed root metadata; rotate them",
        description="Signing keys and root metadata for model bundles (a compact form of The Update Framework). "
                    "The root role says which keys may sign roots and bundles and how many signatures each needs.",
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="generate root and bundle keys and root.json v1",
                               description="Generate root-role and bundle-role keys in a new folder and write "
                                           "root.json v1, signed by the root keys.")
    init.add_argument("--dir", required=True, metavar="KEYDIR", help="new (or empty) folder for the keys")
    _role_options(init, 365)
    init.set_defaults(func=_signing(cmd_keys_init))
    rotate = keys_sub.add_parser(
        "rotate", help="new keys and root.json version+1 signed by the old and the new root keys",
        description="Generate new keys in NEWDIR and write NEWDIR/root.json with the next version, signed by the "
                    "threshold of the current root keys (from KEYDIR) and by the new root keys, as devices require. "
                    "Bundle keys left out of the new root stop being trusted once devices apply it.")
    rotate.add_argument("--dir", required=True, metavar="KEYDIR", help="folder with the current root.json and root-*.pem")
    rotate.add_argument("--new-dir", required=True, metavar="NEWDIR", help="new (or empty) folder for the new keys")
    rotate.add_argument("--keep-bundle-keys", action="store_true",
                        help="keep the current bundle keys (copied to NEWDIR) and rotate the root keys only")
    _role_options(rotate, 365)
    rotate.set_defaults(func=_signing(cmd_keys_rotate))

    bundle = subparsers.add_parser(
        "bundle", help="sign a model version folder into a bundle file for the sidecar",
        description="Model bundles: one uncompressed tar with signed metadata.json first, then files/...")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True)
    create = bundle_sub.add_parser(
        "create", help="sign MODEL_VERSION_DIR (e.g. model_repository/detect_detector/1) into a bundle",
        description="Hash every file of a Triton model version folder, sign the metadata with the bundle keys of "
                    "KEYDIR and write one deterministic tar (same inputs, same bytes). __pycache__ is skipped; "
                    "links and special files are refused.")
    create.add_argument("model_version_dir", metavar="MODEL_VERSION_DIR", help="the model version folder to bundle")
    create.add_argument("--model-name", required=True, help="the Triton model it is for, e.g. detect_detector")
    create.add_argument("--model-version", required=True, help="semantic version of this build, e.g. 1.2.0")
    create.add_argument("--target", required=True, choices=TARGETS)
    create.add_argument("--metadata-version", type=int, required=True, metavar="N",
                        help="signed metadata version: must grow with every bundle of this model name "
                             "(devices refuse older ones, and a different bundle under an installed version)")
    create.add_argument("--keys", required=True, metavar="KEYDIR", help="folder with bundle-*.pem (and root.json)")
    create.add_argument("--out", required=True, metavar="FILE", help="bundle file to write")
    create.add_argument("--config", metavar="PATH", help="config.pbtxt to carry (e.g. the model folder's)")
    create.add_argument("--build-manifest", metavar="PATH", help="build manifest.json to carry (its manifest_sha256 is checked)")
    create.add_argument("--expected-outputs", metavar="PATH",
                        help="JSON list of {image_b64, boxes, scores, class_ids} the health gate must reproduce, or "
                             "a golden file (bundle golden)")
    create.add_argument("--device-class", action="append", metavar="CLASS",
                        help="a device class the model is built for (repeat for several; see `edgestack device-info`). "
                             "Default: the --build-manifest's device_classes, else every class of --target for a "
                             "float model; an INT8 model needs one of the two")
    create.add_argument("--verified-on", action="append", metavar="CLASS",
                        help="a device class on which the model's fidelity was measured (repeat); devices of other "
                             "classes require the bundle's expected outputs to pass their gate")
    create.add_argument("--base", metavar="BASE_VERSION_DIR",
                        help="make a delta bundle against this base version folder (as built): unchanged files "
                             "are not shipped, changed ones as the smallest delta that verifies; devices apply it "
                             "only on top of files with the base's sha256")
    create.add_argument("--base-version", metavar="SEMVER", help="the base's model version (with --base)")
    create.add_argument("--delta-methods", default=",".join(DELTA_METHODS), metavar="M1,M2",
                        help=f"delta methods to try (default {','.join(DELTA_METHODS)})")
    create.add_argument("--expires-days", type=float, default=90, metavar="D",
                        help="the metadata expires after D days (default 90): devices refuse it afterwards")
    add_bundle_create_options(create)
    create.set_defaults(func=_signing(cmd_bundle_create))
    add_golden_parser(bundle_sub)
    return keys, bundle
