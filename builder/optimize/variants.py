"""What a built model variant is, and how to run one for evaluation (the contract between the parts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


class VariantRunner(Protocol):
    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """The detector's raw outputs (the spec's output tensors, in the format's role order) for a model-input
        batch [N, ...] (float32)."""


@dataclass(frozen=True)
class Variant:
    """One artifact built from the source model.

    name: unique and filesystem-safe, e.g. "fp32", "int8-entropy-perchannel", "ov-int8".
    runtime: which engine runs it; path: the model file (model.onnx, model.xml with its .bin, model.plan).
    options: how it was made (calibration method, per-channel, excluded nodes...), recorded in the manifest.
    targets: the pipeline targets that can serve it (cpu, intel, nvidia-gpu, jetson).
    """

    name: str
    runtime: str
    precision: str
    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"variant {self.name}: runtime {self.runtime!r} is not one of {RUNTIMES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"variant {self.name}: precision {self.precision!r} is not one of {PRECISIONS}")
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"variant name {self.name!r} must be non-empty without slashes or spaces")

    def files(self) -> tuple[Path, ...]:
        """Every file the variant consists of (an OpenVINO IR is .xml + .bin)."""
        if self.path.suffix == ".xml":
            return (self.path, self.path.with_suffix(".bin"))
        return (self.path,)


VARIANT_FILE = "variant.json"


def save_variant(variant: Variant, manifest: dict[str, Any] | None = None,
                 device_classes: dict[str, Any] | None = None) -> Path:
    """Write variant.json (the Variant, its device classes and its build manifest) beside the variant's model file.

    device_classes: builder.device_class.ArtifactClasses.to_dict() (built_for, verified_on, notes)."""
    import json

    record = {
        "name": variant.name,
        "runtime": variant.runtime,
        "precision": variant.precision,
        "file": variant.path.name,
        "options": variant.options,
        "targets": list(variant.targets),
        "manifest": manifest or {},
    }
    if device_classes is not None:
        record["device_classes"] = device_classes
    out = variant.path.parent / VARIANT_FILE
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def load_variant(folder: Path) -> tuple[Variant, dict[str, Any]]:
    """The Variant stored in folder/variant.json and its manifest."""
    import json

    from builder.errors import BuilderError

    path = Path(folder) / VARIANT_FILE
    if not path.is_file():
        raise BuilderError(f"{folder} is not a built variant (no {VARIANT_FILE}); run `edgestack optimize` first")
    record = json.loads(path.read_text())
    variant = Variant(record["name"], record["runtime"], record["precision"], Path(folder).resolve() / record["file"],
                      record.get("options", {}), tuple(record.get("targets", ("cpu",))))
    missing = [str(f) for f in variant.files() if not f.is_file()]
    if missing:
        raise BuilderError(f"variant {variant.name} is incomplete, missing: {missing}")
    return variant, record.get("manifest", {})
