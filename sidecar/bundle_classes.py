"""Which devices a bundle is for: its signed device classes (builder.device_class), and their defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from builder.device_class import ArtifactClasses, DeviceClassError, target_classes
from builder.targets import GPU_TARGETS
from sidecar.errors import BundleError


def bundle_classes(signed: Mapping[str, Any]) -> ArtifactClasses:
    """The device classes a bundle's model is built (and verified) for."""
    if "device_classes" not in signed:
        raise BundleError("bundle metadata names no device_classes: sign it again with this version of "
                          "`edgestack bundle create`")
    try:
        return ArtifactClasses.from_dict(signed["device_classes"])
    except DeviceClassError as exc:
        raise BundleError(f"device_classes: {exc}") from exc


# op types whose presence makes a model integer-quantized, as bytes of the ONNX protobuf / OpenVINO IR XML
_INT8_MARKERS = (b"QuantizeLinear", b"QLinearConv", b"ConvInteger", b"MatMulInteger", b"FakeQuantize")


def default_classes(target: str, sources: Mapping[str, Path],
                    build_manifest: Mapping[str, Any] | None = None) -> ArtifactClasses:
    """The classes of a build manifest from `edgestack optimize`, else the target's for a float model; an INT8
    model without a manifest is refused: only its build knows which CPUs compute it exactly."""
    recorded = (build_manifest or {}).get("device_classes")
    if recorded is not None:
        try:
            return ArtifactClasses.from_dict(recorded)
        except DeviceClassError as exc:
            raise BundleError(f"build manifest device_classes: {exc}") from exc
    for rel, path in sources.items():
        if path.suffix in (".onnx", ".xml"):
            with open(path, "rb") as f:
                data = f.read()
            if any(marker in data for marker in _INT8_MARKERS):
                raise BundleError(f"{rel} is an INT8 model: say which device classes it is built for "
                                  "(--device-class, or --build-manifest of the variant from `edgestack optimize`)")
    return ArtifactClasses(target_classes(target), notes={"default": f"float model for target {target}"})


def compatible_targets(target: str) -> tuple[str, ...]:
    """The targets whose bundles a device of `target` takes: GPU targets serve the same detector formats."""
    return GPU_TARGETS if target in GPU_TARGETS else (target,)


def check_fits_device(signed: Mapping[str, Any], target: str | None, device_classes: tuple[str, ...]) -> None:
    """Refuse (BundleError) a bundle for another target or for device classes this device is not of."""
    bundle_target = signed.get("target")
    if target is not None and bundle_target not in compatible_targets(target):
        raise BundleError(f"the bundle is for target {bundle_target}; this device serves target {target}")
    classes = bundle_classes(signed)
    if not classes.fits(device_classes):
        raise BundleError(f"the bundle's model is built for device class(es) {', '.join(classes.built_for)}; "
                          f"this device is {', '.join(device_classes)}: install a bundle built for this class")


def unverified_here(signed: Mapping[str, Any], device_classes: tuple[str, ...]) -> bool:
    """True when the model's fidelity was never measured on a device of this class: its gate must check outputs."""
    return not bundle_classes(signed).verified_for(device_classes)


def repository_variant_manifest(model_version_dir: Path, model_name: str) -> dict[str, Any] | None:
    """The build manifest of the optimized variant a rendered repository serves as `model_name` (recorded in its
    <name>.pipeline.json by `edgestack build --variant`), or None when the folder is not such a repository's."""
    from sidecar.golden import pipeline_records

    for record in pipeline_records(Path(model_version_dir).resolve().parent.parent, model_name).values():
        if record.get("variant", {}).get("manifest"):
            return record["variant"]["manifest"]
    return None
