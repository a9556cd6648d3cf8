"""Build manifest: what a variant is made of and how, so a result can be traced and reproduced.

The manifest holds no timestamp on purpose: the same inputs give a byte-identical manifest.json (and
the same manifest_sha256), so two builds can be compared with a hash. The build time is the file's
mtime. Put only deterministic metrics (accuracy, sizes) in `metrics` to keep that property; latency
varies run to run and belongs in the report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
from pathlib import Path
from typing import Any

from backends.common.files import sha256_file
from builder.optimize.variants import Variant
from builder.spec import PipelineSpec

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

# module to import -> distributions that may provide it (first installed one wins)
TOOLS = {
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
    "numpy": ("numpy",),
}


def tool_versions() -> dict[str, str]:
    """Versions of the tools that can be imported here (read from package metadata; nothing is imported)."""
    versions: dict[str, str] = {}
    for module, dists in TOOLS.items():
        if importlib.util.find_spec(module) is None:
            continue
        for dist in dists:
            try:
                versions[module] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            versions[module] = "unknown"
    versions["python"] = platform.python_version()
    versions["platform"] = platform.platform()
    return versions


def to_json(value: Any) -> Any:
    """JSON-safe copy: Paths and numpy scalars to plain values, tuples to lists, NaN/inf to None, keys to str."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_json(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalar
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def build_manifest(variant: Variant, *, source_model: Path, spec: PipelineSpec, calibration_sha256: str | None,
                   metrics: dict, device_classes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variant's files and their sha256, the source model's, the spec, tool versions, calibration hash,
    metrics, options and device classes (ArtifactClasses.to_dict(): built_for, verified_on, notes);
    manifest_sha256 is the hash of all of that (canonical JSON, sorted keys)."""
    source_model = Path(source_model)
    manifest = {
        "format": MANIFEST_FORMAT,
        "variant": {
            "name": variant.name,
            "runtime": variant.runtime,
            "precision": variant.precision,
            "file": variant.path.name,
            "targets": list(variant.targets),
        },
        "files": {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in variant.files()},
        "source_model": {"file": source_model.name, "sha256": sha256_file(source_model),
                         "bytes": source_model.stat().st_size},
        "spec": spec.to_dict(),
        "tools": tool_versions(),
        "calibration_sha256": calibration_sha256,
        "metrics": metrics,
        "options": variant.options,
    }
    if device_classes is not None:
        manifest["device_classes"] = device_classes
    manifest = to_json(manifest)
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Recompute the hash build_manifest stored (everything but manifest_sha256 itself)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical(to_json(body))).hexdigest()


def write_manifest(manifest: dict[str, Any], folder: Path) -> Path:
    """folder/manifest.json: sorted keys, 2-space indent, trailing newline, no NaN (null instead)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(to_json(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path
