"""Device classes: what an artifact needs of a device and what a device is, as one signed fact.

An INT8 model is only right on the CPUs whose integer kernels compute it exactly: ONNX Runtime's U8S8
kernels on x86 without VNNI multiply with VPMADDUBSW, whose 16-bit pair sums saturate (255 * 127 * 2 > 32767),
so a model quantized with full-range int8 weights loses detections there while it is exact on VNNI. The class
is therefore the unit in which artifacts are built, verified and installed:

  x86-vnni      x86-64 with AVX512-VNNI or AVX-VNNI (U8S8 exact)
  x86-avx512    x86-64 with AVX-512 (F, BW) and no VNNI (U8S8 saturates)
  x86-avx2      x86-64 with AVX2 and no AVX-512 and no VNNI (U8S8 saturates)
  x86-sse       older x86-64
  arm64-dotprod AArch64 with the dot-product extension (asimddp / FEAT_DotProd)
  arm64-neon    AArch64 without it
  cuda-smXY     an NVIDIA GPU of compute capability X.Y (TensorRT engines are built per capability)
  cuda-any      (artifacts only) any NVIDIA GPU: an ONNX model that ONNX Runtime's TensorRT EP compiles on the device

DeviceInfo is the whole descriptor (`edgestack device-info` prints it); DeviceClass names are what variant
manifests and bundle metadata carry: `{"built_for": [...], "verified_on": [...]}` (artifact_classes).
"""
from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from builder.errors import BuilderError
from builder.targets import GPU_TARGETS, OPENVINO_TARGETS, TARGETS

X86_CLASSES = ("x86-vnni", "x86-avx512", "x86-avx2", "x86-sse")
ARM_CLASSES = ("arm64-dotprod", "arm64-neon")
CPU_CLASSES = (*X86_CLASSES, *ARM_CLASSES)
CUDA_CLASS = re.compile(r"^cuda-sm(\d)(\d+)$")
ANY_CUDA = "cuda-any"

# /proc/cpuinfo flag -> the feature name used here (x86 "flags", AArch64 "Features")
_X86_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
                 "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
                 "amx_int8": "amx_int8", "amx_bf16": "amx_bf16", "amx_tile": "amx_tile", "sse4_2": "sse4_2"}
_ARM_FEATURES = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "fphp": "fp16",
                 "asimdhp": "fp16"}


class DeviceClassError(BuilderError, ValueError):
    """An unknown device class name or a malformed class record."""


def check_class(name: Any) -> str:
    if isinstance(name, str) and (name in CPU_CLASSES or name == ANY_CUDA or CUDA_CLASS.match(name)):
        return name
    raise DeviceClassError(f"unknown device class {name!r}; one of {', '.join(CPU_CLASSES)}, cuda-smXY or {ANY_CUDA}")


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is: architecture, CPU features, accelerator, Triton version; and its classes."""

    arch: str
    cpu_model: str = ""
    cpu_features: tuple[str, ...] = ()
    accelerator: str | None = None  # e.g. "NVIDIA Orin" or None
    compute_capability: str | None = None  # e.g. "8.7"
    triton_version: str | None = None

    @property
    def cpu_class(self) -> str:
        return cpu_class(self.arch, self.cpu_features)

    @property
    def classes(self) -> tuple[str, ...]:
        """The CPU class, then the accelerator's class when there is one."""
        if self.compute_capability:
            major, minor = self.compute_capability.split(".", 1)
            return (self.cpu_class, f"cuda-sm{major}{minor}")
        return (self.cpu_class,)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_features": list(self.cpu_features), "cpu_class": self.cpu_class,
                "classes": list(self.classes)}


def cpu_class(arch: str, features: Iterable[str]) -> str:
    features = set(features)
    if arch in ("aarch64", "arm64"):
        return "arm64-dotprod" if "dotprod" in features else "arm64-neon"
    if arch not in ("x86_64", "amd64", "AMD64"):
        raise DeviceClassError(f"no device class for architecture {arch!r}")
    if features & {"avx512_vnni", "avx_vnni"}:
        return "x86-vnni"
    if {"avx512f", "avx512bw"} <= features:
        return "x86-avx512"
    if "avx2" in features:
        return "x86-avx2"
    return "x86-sse"


def parse_cpuinfo(text: str, arch: str) -> tuple[str, tuple[str, ...]]:
    """(model name, features) from the text of /proc/cpuinfo."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    table = _ARM_FEATURES if arch in ("aarch64", "arm64") else _X86_FEATURES
    return model, tuple(sorted({table[f] for f in flags if f in table}))


def _nvidia_gpu() -> tuple[str | None, str | None]:
    """(name, compute capability) of the first NVIDIA GPU, from NVML or Jetson's device tree; (None, None)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)), f"{major}.{minor}"
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU: no accelerator
        pass
    model = Path("/proc/device-tree/model")
    jetson_cc = {"orin": "8.7", "xavier": "7.2", "nano": "5.3", "tx2": "6.2"}
    if model.is_file():
        text = model.read_text(errors="replace").strip("\0 \n")
        for key, cc in jetson_cc.items():
            if "jetson" in text.lower() and key in text.lower():
                return text, cc
    return None, None


def triton_version() -> str | None:
    """The Triton server version of the installed nvidia-pytriton wheel (or tritonserver's own VERSION file)."""
    for candidate in (os.environ.get("TRITON_VERSION_FILE"), "/opt/tritonserver/TRITON_VERSION"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text().strip()
    try:
        import importlib.metadata

        version = importlib.metadata.version("nvidia-pytriton")
        return {"0.7.0": "2.51.0"}.get(version, f"pytriton {version}")
    except Exception:  # noqa: BLE001
        return None


def detect(cpuinfo: str | None = None, arch: str | None = None, *, gpu: bool = True) -> DeviceInfo:
    """This machine's DeviceInfo (cpuinfo / arch given: that machine's, for tests and for other devices)."""
    arch = arch or platform.machine()
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    model, features = parse_cpuinfo(cpuinfo, arch)
    name, cc = _nvidia_gpu() if gpu else (None, None)
    return DeviceInfo(arch=arch, cpu_model=model, cpu_features=features, accelerator=name,
                      compute_capability=cc, triton_version=triton_version())


def host_class() -> str:
    """The CPU class of this machine (EDGESTACK_DEVICE_CLASS overrides it, e.g. under an emulated CPU)."""
    override = os.environ.get("EDGESTACK_DEVICE_CLASS")
    return check_class(override) if override else detect(gpu=False).cpu_class


# --- what an artifact needs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArtifactClasses:
    """The device classes an artifact is built for, and those of them on which its fidelity was measured."""

    built_for: tuple[str, ...]
    verified_on: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.built_for:
            raise DeviceClassError("an artifact must be built for at least one device class")
        for name in (*self.built_for, *self.verified_on):
            check_class(name)
        stray = sorted(set(self.verified_on) - set(self.built_for))
        if stray:
            raise DeviceClassError(f"verified on {stray} but not built for them")

    def fits(self, device_classes: Iterable[str]) -> bool:
        device = set(device_classes)
        if ANY_CUDA in self.built_for and any(CUDA_CLASS.match(c) for c in device):
            return True
        return bool(device & set(self.built_for))

    def verified_for(self, device_classes: Iterable[str]) -> bool:
        return bool(set(device_classes) & set(self.verified_on))

    def to_dict(self) -> dict[str, Any]:
        return {"built_for": list(self.built_for), "verified_on": list(self.verified_on), "notes": dict(self.notes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArtifactClasses":
        if not isinstance(data, Mapping) or not isinstance(data.get("built_for"), list):
            raise DeviceClassError(f"device classes must be {{'built_for': [...], 'verified_on': [...]}}, got {data!r:.80}")
        notes = data.get("notes") or {}
        if not isinstance(notes, Mapping) or not isinstance(data.get("verified_on", []), list):
            raise DeviceClassError("device classes: verified_on must be a list and notes a mapping")
        return cls(tuple(data["built_for"]), tuple(data.get("verified_on", [])),
                   {str(k): str(v) for k, v in notes.items()})


# what a model of each deployment target runs on when nothing more is known of it (FP32 / FP16 models)
TARGET_CLASSES = {target: (ANY_CUDA,) if target in GPU_TARGETS else X86_CLASSES if target in OPENVINO_TARGETS
                  else CPU_CLASSES for target in TARGETS}


def target_classes(target: str) -> tuple[str, ...]:
    if target not in TARGET_CLASSES:
        raise DeviceClassError(f"unknown target {target!r}; one of {', '.join(TARGET_CLASSES)}")
    return TARGET_CLASSES[target]


def main() -> int:
    """`edgestack device-info`: this device's descriptor as JSON."""
    print(json.dumps(detect().to_dict(), indent=2))
    return 0
