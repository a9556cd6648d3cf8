"""What one registry push publishes, worked out from the signed bundles before anything is written.

read_bundle       a bundle's signed metadata: read without trusting it (sidecar.bundle.read_signed_unverified),
                  or verified against a root.json with the sidecar's own trust code (TrustStore +
                  verify_bundle: signatures, expiry, and every file's hash for a full bundle; a delta bundle's
                  files need their base, so only its metadata is verified)
index_bundles     the release's bundle per device class: one model name and one semver for all bundles, and
                  no device class claimed by two of them (a bundle counts for every class it is built for)
report_metrics    measured metrics per class from an `edgestack optimize` report.json (the row of the
                  variant each bundle's build manifest names; latencies only for the class it ran on)
parse_metric      one `CLASS:NAME=VALUE` option
Every refusal is a RegistryError naming the bundle (file) and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fleet.errors import ProtocolError, RegistryError
from fleet.protocol import check_token

METRIC_NAMES = ("fidelity_map", "p50_ms", "p99_ms", "power_w")


@dataclass(frozen=True)
class BundleInfo:
    """One signed bundle file as the registry records it."""
    path: Path
    model_name: str
    model_version: str  # semver, as signed
    target: str
    metadata_version: int
    built_for: tuple[str, ...]
    verified_on: tuple[str, ...]
    sha256: str
    size: int
    delta_base: str | None = None  # the model_version a delta bundle applies on top of
    build_manifest: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def manifest_summary(self) -> dict[str, Any]:
        """Quantization, calibration set and source hashes: what the signed build manifest has of them."""
        manifest = self.build_manifest
        summary: dict[str, Any] = {}
        variant = manifest.get("variant") if isinstance(manifest.get("variant"), Mapping) else {}
        for key in ("name", "runtime", "precision"):
            if variant.get(key) is not None:
                summary["variant" if key == "name" else key] = variant[key]
        options = manifest.get("options") if isinstance(manifest.get("options"), Mapping) else {}
        calibration = manifest.get("calibration_sha256") or options.get("calibration_sha256")
        if calibration is not None:
            summary["calibration_sha256"] = calibration
        source = manifest.get("source_model")
        if isinstance(source, Mapping) and source.get("sha256"):
            summary["source_model"] = {k: source[k] for k in ("file", "sha256") if k in source}
        if manifest.get("manifest_sha256"):
            summary["manifest_sha256"] = manifest["manifest_sha256"]
        for key in ("calibration", "quant_format", "activation_type", "weight_type", "calibration_count"):
            if options.get(key) is not None:
                summary[key] = options[key]
        return summary


def file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class _MetadataVerified(Exception):
    """Raised from verify_bundle's accept hook to stop before extracting a delta bundle's files."""

    def __init__(self, signed: Mapping[str, Any]):
        super().__init__("metadata verified")
        self.signed = signed


def _verified_signed(path: Path, root_envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    from sidecar.bundle import verify_bundle
    from sidecar.errors import SidecarError
    from sidecar.trust import TrustStore

    def stop_before_delta(signed: Mapping[str, Any]) -> None:
        if signed.get("base") is not None:
            raise _MetadataVerified(signed)

    with tempfile.TemporaryDirectory(prefix="edgestack-registry-verify-") as tmp:
        try:
            trust = TrustStore(Path(tmp) / "trust")
            trust.initialize(dict(root_envelope))
            return verify_bundle(path, trust, Path(tmp) / "staging", accept=stop_before_delta).signed
        except _MetadataVerified as done:
            return done.signed
        except SidecarError as exc:
            raise RegistryError(f"{path.name}: does not verify against the given root: {exc}") from exc


def read_bundle(path: Path, root_envelope: Mapping[str, Any] | None = None) -> BundleInfo:
    """The registry's record of one bundle file; verified against root_envelope (a root.json) when given."""
    from sidecar.bundle import SEMVER, read_signed_unverified
    from sidecar.bundle_classes import bundle_classes
    from sidecar.errors import SidecarError

    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"bundle {path} does not exist")
    try:
        signed = _verified_signed(path, root_envelope) if root_envelope is not None else read_signed_unverified(path)
        classes = bundle_classes(signed)
    except SidecarError as exc:
        raise RegistryError(f"{path.name}: {exc}") from exc
    name, semver = signed.get("model_name"), signed.get("model_version")
    try:
        check_token(name, "model_name")
    except ProtocolError as exc:
        raise RegistryError(f"{path.name}: signed {exc} (fleet model names are NATS tokens)") from exc
    if not isinstance(semver, str) or not SEMVER.match(semver):
        raise RegistryError(f"{path.name}: signed model_version {semver!r:.40} is not a semantic version (1.2.0)")
    metadata_version, target = signed.get("version"), signed.get("target")
    if isinstance(metadata_version, bool) or not isinstance(metadata_version, int) or metadata_version < 1:
        raise RegistryError(f"{path.name}: signed version (metadata version) must be a positive integer, "
                            f"not {metadata_version!r:.40}")
    if not isinstance(target, str) or not target:
        raise RegistryError(f"{path.name}: signed target is missing")
    manifest = signed.get("build_manifest") or {}
    if not isinstance(manifest, Mapping):
        raise RegistryError(f"{path.name}: signed build_manifest must be an object, not {type(manifest).__name__}")
    base = signed.get("base")
    digest, size = file_sha256(path)
    return BundleInfo(path=path, model_name=name, model_version=semver, target=target,
                      metadata_version=metadata_version, built_for=tuple(classes.built_for),
                      verified_on=tuple(classes.verified_on), sha256=digest, size=size,
                      delta_base=base.get("model_version") if isinstance(base, Mapping) else None,
                      build_manifest=dict(manifest))


def index_bundles(bundles: Sequence[BundleInfo]) -> dict[str, BundleInfo]:
    """device class -> bundle, for bundles of one model and one semver; RegistryError otherwise."""
    if not bundles:
        raise RegistryError("push needs at least one bundle")
    first = bundles[0]
    index: dict[str, BundleInfo] = {}
    names: dict[str, Path] = {}
    for info in bundles:
        if (info.model_name, info.model_version) != (first.model_name, first.model_version):
            raise RegistryError(f"{info.path.name} is {info.model_name} {info.model_version}, {first.path.name} is "
                                f"{first.model_name} {first.model_version}: one push publishes one model version")
        if info.path.name in names and info.path.resolve() == names[info.path.name].resolve():
            raise RegistryError(f"{info.path} is given twice")
        if info.path.name in names:
            raise RegistryError(f"{info.path} and {names[info.path.name]} have the same file name; rename one")
        names[info.path.name] = info.path
        for device_class in info.built_for:
            if device_class in index:
                raise RegistryError(f"device class {device_class} is claimed by both {index[device_class].path.name} "
                                    f"and {info.path.name}: a class gets one bundle per version")
            index[device_class] = info
    return index


def _metric_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RegistryError(f"{where} must be a finite number >= 0, not {value!r:.40}")
    return float(value)


def check_metrics(metrics: Mapping[str, Any], classes: Sequence[str], where: str = "metrics") -> dict[str, dict[str, float]]:
    """{class: {name: value}} with known names and numbers, for classes this release has a bundle for."""
    if not isinstance(metrics, Mapping):
        raise RegistryError(f"{where} must map device classes to {{metric: value}}, not {type(metrics).__name__}")
    checked: dict[str, dict[str, float]] = {}
    for device_class, values in metrics.items():
        if device_class not in classes:
            raise RegistryError(f"{where}: no bundle of this push is built for device class {device_class!r} "
                                f"(classes: {', '.join(sorted(classes))})")
        if not isinstance(values, Mapping):
            raise RegistryError(f"{where}.{device_class} must be an object of metrics, not {type(values).__name__}")
        for name, value in values.items():
            if name not in METRIC_NAMES:
                raise RegistryError(f"{where}.{device_class}.{name}: unknown metric; known: {', '.join(METRIC_NAMES)}")
            checked.setdefault(device_class, {})[name] = _metric_value(value, f"{where}.{device_class}.{name}")
        if "fidelity_map" in checked.get(device_class, {}) and checked[device_class]["fidelity_map"] > 1:
            raise RegistryError(f"{where}.{device_class}.fidelity_map must be in [0, 1]")
    return checked


def parse_metric(text: str) -> tuple[str, str, float]:
    """`x86-avx2:p99_ms=41.5` -> (class, name, value)."""
    device_class, sep, rest = text.partition(":")
    name, eq, value = rest.partition("=")
    if not sep or not eq or not device_class or name not in METRIC_NAMES:
        raise RegistryError(f"--metric {text!r}: expected CLASS:NAME=VALUE with NAME one of {', '.join(METRIC_NAMES)}")
    try:
        number = float(value)
    except ValueError:
        raise RegistryError(f"--metric {text!r}: {value!r} is not a number") from None
    return device_class, name, _metric_value(number, f"--metric {device_class}:{name}")


def report_metrics(report_path: Path, bundles: Sequence[BundleInfo]) -> dict[str, dict[str, float]]:
    """Metrics per device class from an `edgestack optimize` report.json: for each bundle, the row of the variant
    its build manifest names. Fidelity (mAP@0.5 vs FP32) holds for the classes the row was verified on; its
    latencies for the class of the machine that measured them (context.host_device_class), if the bundle is for it."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the optimize report {report_path}: {exc}") from exc
    if not isinstance(report, Mapping) or not isinstance(report.get("variants"), list):
        raise RegistryError(f"{report_path}: not an `edgestack optimize` report.json (no variants list)")
    context = report.get("context") if isinstance(report.get("context"), Mapping) else {}
    host = context.get("host_device_class")
    rows = {row.get("name"): row for row in report["variants"] if isinstance(row, Mapping)}
    metrics: dict[str, dict[str, float]] = {}
    for info in bundles:
        variant = info.manifest_summary().get("variant")
        row = rows.get(variant)
        if row is None:
            raise RegistryError(f"{report_path}: no variant {variant!r} (the build manifest of {info.path.name}) "
                                f"among {', '.join(sorted(map(str, rows))) or 'none'}")
        verified = (row.get("device_classes") or {}).get("verified_on") or ([host] if host else [])
        for device_class in info.built_for:
            values: dict[str, float] = {}
            if device_class in verified and row.get("map50") is not None:
                values["fidelity_map"] = _metric_value(row["map50"], f"{report_path}: {variant}.map50")
            if device_class == host:
                for name in ("p50_ms", "p99_ms"):
                    if row.get(name) is not None:
                        values[name] = _metric_value(row[name], f"{report_path}: {variant}.{name}")
            if values:
                metrics[device_class] = values
    return metrics


def merge_metrics(*sources: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Later sources override earlier ones, metric by metric."""
    merged: dict[str, dict[str, float]] = {}
    for source in sources:
        for device_class, values in source.items():
            merged.setdefault(device_class, {}).update(values)
    return merged
