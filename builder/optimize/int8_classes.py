"""INT8 per device class: the quantization settings the builder uses for a target class, and the classes whose
integer kernels compute a built model exactly (its `built_for`).

ONNX Runtime's U8S8 kernels (uint8 activations x int8 weights) multiply with VPDPBUSD where the CPU has VNNI:
32-bit sums, exact. Without VNNI (AVX-512 F/BW, AVX2, SSE4.1) MLAS multiplies with (V)PMADDUBSW, whose 16-bit
sums of two u8 x s8 products saturate (2 * 255 * 127 > 32767): a model with full-range int8 weights loses
detections there (ORT's `session.x64quantprecision` notes the same). 7-bit weights (reduce_range: 2 * 255 * 63 <
32767) or uint8 weights (U8U8: MLAS widens to 16 bits and uses PMADDWD) are exact on every x86 class; MLAS's ARM
kernels (NEON widening multiplies, UDOT/SDOT) accumulate in 32 bits, so ARM has no such limit. OpenVINO's CPU
plugin has the same instruction and the same problem; NNCF's OverflowFix.ENABLE quantizes weights to 7 bits.

Measured (benchmarks/int8_device_classes.py, BENCHMARKS.md "INT8 per device class"; FAST_INT8 recipe, 5 calibration
images, fidelity mAP@0.5 vs FP32 on the 14 photos) on x86-avx2 under `qemu-x86_64 -cpu Haswell`: full-range U8S8
0.358 (0.987 on x86-vnni), reduce_range 0.970 (same as on x86-vnni: exact), S8S8 0.181, U8U8 0.069 (per-tensor
weights: ORT cannot run per-channel uint8 weights of this model; exact, so measured on the host). reduce_range is
the pick for every x86 class without VNNI. OpenVINO INT8 there: NNCF's default 0.347, OverflowFix.ENABLE 1.000.
x86-avx512 and x86-sse were not emulated: their settings follow from the same instruction, not from a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from builder.device_class import (ARM_CLASSES, CPU_CLASSES, X86_CLASSES, ArtifactClasses, DeviceClassError,
                                  check_class, detect, target_classes)
from builder.errors import BuilderError
from builder.targets import GPU_TARGETS

# x86 classes whose U8S8 kernels sum pairs of products in 16 bits (saturating)
SATURATING_X86 = tuple(c for c in X86_CLASSES if c != "x86-vnni")
OVERFLOW_FIXES = ("disable", "first_layer_only", "enable")  # nncf.quantization.advanced_parameters.OverflowFix


@dataclass(frozen=True)
class Int8Settings:
    """What the builder does differently for one target class.

    ort: QuantOptions fields of every ONNX Runtime INT8 variant (on top of the recipe, e.g. FAST_INT8).
    openvino_overflow_fix: NNCF's OverflowFix for ov-int8 (None: NNCF's default, first layer only).
    """

    device_class: str
    ort: Mapping[str, Any]
    openvino_overflow_fix: str | None
    why: str


_PORTABLE = {"reduce_range": True}
INT8_CLASSES: dict[str, Int8Settings] = {
    "x86-vnni": Int8Settings("x86-vnni", {}, None,
                             "VPDPBUSD sums u8 x s8 in 32 bits: full-range U8S8, the fastest (docs/INT8.md)"),
    **{c: Int8Settings(c, _PORTABLE, "enable",
                       "(V)PMADDUBSW saturates full-range U8S8: 7-bit weights (reduce_range, NNCF overflow fix)")
       for c in SATURATING_X86},
    **{c: Int8Settings(c, {}, None, "MLAS's ARM kernels accumulate in 32 bits: full-range U8S8")
       for c in ARM_CLASSES},
}


class Int8ClassError(BuilderError):
    """No INT8 settings for a device class (e.g. a GPU class: TensorRT calibrates on the device)."""


def settings_for(device_class: str) -> Int8Settings:
    try:
        check_class(device_class)
    except DeviceClassError as exc:
        raise Int8ClassError(str(exc)) from exc
    if device_class not in INT8_CLASSES:
        raise Int8ClassError(f"no CPU INT8 settings for device class {device_class!r}; one of {', '.join(INT8_CLASSES)}")
    return INT8_CLASSES[device_class]


def exact_classes(options: Any) -> tuple[str, ...]:
    """The CPU classes whose ONNX Runtime kernels compute a model built with these QuantOptions exactly."""
    narrow_weights = options.reduce_range or options.weight_type == "uint8"
    if narrow_weights:
        return CPU_CLASSES
    return ("x86-vnni", *ARM_CLASSES)


def openvino_exact_classes(overflow_fix: str | None) -> tuple[str, ...]:
    """The CPU classes on which OpenVINO runs an NNCF INT8 IR with this OverflowFix exactly (x86 only here)."""
    if overflow_fix is not None and overflow_fix not in OVERFLOW_FIXES:
        raise Int8ClassError(f"overflow_fix {overflow_fix!r} is not one of {OVERFLOW_FIXES}")
    return X86_CLASSES if overflow_fix == "enable" else ("x86-vnni",)


def built_for(variant: Any) -> tuple[str, ...]:
    """The device classes a built Variant is for: where its kernels compute it as built (INT8: exactly)."""
    def union(*groups: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for group in groups for c in group))

    if variant.runtime == "tensorrt":
        gpus = tuple(c for c in detect().classes if c.startswith("cuda-sm"))
        if not gpus:
            raise Int8ClassError("a TensorRT plan is built for the GPU it was built on, and this machine has none")
        return gpus
    gpu = union(*(target_classes(t) for t in variant.targets if t in GPU_TARGETS))
    if variant.precision != "int8":
        return union(*(target_classes(t) for t in variant.targets))
    if variant.runtime == "openvino":
        return openvino_exact_classes(variant.options.get("overflow_fix"))
    from builder.optimize.ort_variants import QuantOptions

    fields = {k: variant.options[k] for k in QuantOptions.__dataclass_fields__ if k in variant.options}
    return union(exact_classes(QuantOptions(**fields)), gpu)


def artifact_classes(classes: tuple[str, ...], host: str, target: str | None = None) -> ArtifactClasses:
    """ArtifactClasses of a variant whose fidelity was measured on `host`: verified there when it is built for it."""
    classes = tuple(classes)
    if host in classes:
        notes = {c: f"not run on {c}; its kernels compute this model exactly, so the fidelity measured on {host} holds"
                 for c in classes if c != host and c in CPU_CLASSES}
        return ArtifactClasses(classes, (host,), notes)
    where = f" (built for target {target})" if target else ""
    notes = {c: f"unverified on {c}{where}: fidelity was measured on {host}, whose kernels do not compute this "
                f"model exactly" for c in classes}
    return ArtifactClasses(classes, (), notes)
