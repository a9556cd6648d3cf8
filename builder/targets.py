"""Accelerator target profiles: one small validated class per target.

A profile decides how each step of the pipeline is served: which backend/platform runs the detector,
where instances live (KIND_CPU / KIND_GPU), how many, and the batching defaults. The pipeline spec's
`runtime` section overrides the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from builder.errors import TargetError

DETECTOR_ENGINES = ("python_onnxruntime", "python_openvino", "onnxruntime_onnx", "tensorrt_plan")
PYTHON_DETECTOR_ENGINES = ("python_onnxruntime", "python_openvino")  # the detector is a Python-backend model
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    detector_engine: str
    instance_kind: str
    detector_instances: int = 1
    preprocess_instances: int = 1
    postprocess_instances: int = 1
    router_instances: int = 1
    intra_op_threads: int = 1
    intra_op_spinning: bool = False  # ONNX Runtime's busy-waiting intra-op threads (backends/detector/onnx_runner.py)
    detector_streams: int = 1  # OpenVINO streams per detector instance for batches (backends/detector/openvino_runner.py)
    max_batch_size: int = 8
    max_queue_delay_us: int = 0
    precision: str = "fp32"
    gpus: tuple[int, ...] = ()
    max_workspace_bytes: int = 0
    fuse_input_conversion: bool = False  # preprocess emits uint8, the graph converts (see input_fusion.py)
    device: str = ""  # OpenVINO device of a python_openvino detector: CPU or AUTO

    def __post_init__(self) -> None:
        if self.detector_engine not in DETECTOR_ENGINES:
            raise TargetError(f"{self.name}: detector engine {self.detector_engine!r} is not one of {DETECTOR_ENGINES}")
        if self.precision not in PRECISIONS:
            raise TargetError(f"{self.name}: precision {self.precision!r} is not one of {PRECISIONS}")
        counts = (self.detector_instances, self.preprocess_instances, self.postprocess_instances, self.router_instances)
        if min(counts) < 1:
            raise TargetError(f"{self.name}: instance counts must be at least 1, got {counts}")
        if self.intra_op_threads < 0:
            raise TargetError(f"{self.name}: intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.max_batch_size < 1:
            raise TargetError(f"{self.name}: max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise TargetError(f"{self.name}: max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if not isinstance(self.detector_streams, int) or self.detector_streams < 1:
            raise TargetError(f"{self.name}: detector_streams must be an integer >= 1, got {self.detector_streams!r}")
        if self.detector_streams > 1 and self.detector_engine != "python_openvino":
            raise TargetError(f"{self.name}: detector_streams (OpenVINO streams) only applies to the python_openvino "
                              f"detector (the intel target), not {self.detector_engine}")
        if self.device and self.detector_engine != "python_openvino":
            raise TargetError(f"{self.name}: device {self.device!r} only applies to the python_openvino detector")

    @property
    def on_gpu(self) -> bool:
        return self.instance_kind == "KIND_GPU"

    @property
    def python_detector(self) -> bool:
        return self.detector_engine in PYTHON_DETECTOR_ENGINES


@dataclass(frozen=True)
class CpuTarget(TargetProfile):
    """x86/ARM CPU: the detector is a Python-backend model running ONNX Runtime with explicit threads."""

    name: str = "cpu"
    detector_engine: str = "python_onnxruntime"
    instance_kind: str = "KIND_CPU"
    detector_instances: int = 2
    intra_op_threads: int = 1
    fuse_input_conversion: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detector_engine != "python_onnxruntime" or self.on_gpu:
            raise TargetError("cpu target runs the detector with ONNX Runtime in the Python backend on KIND_CPU")
        if self.precision == "fp16":
            raise TargetError("cpu target: fp16 is not faster on CPUs; use fp32 or an int8 model")


@dataclass(frozen=True)
class IntelTarget(TargetProfile):
    """Intel (or any x86) CPU: the detector is a Python-backend model running an OpenVINO IR
    (FP32/FP16/INT8 from builder/optimize/openvino_variants.py) with explicit threads. With
    fuse_input_conversion the compiled model takes uint8 pixels and converts them itself (PrePostProcessor)."""

    name: str = "intel"
    detector_engine: str = "python_openvino"
    instance_kind: str = "KIND_CPU"
    detector_instances: int = 2
    intra_op_threads: int = 1
    fuse_input_conversion: bool = True
    device: str = "CPU"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.detector_engine != "python_openvino" or self.on_gpu:
            raise TargetError("intel target runs the detector with OpenVINO in the Python backend on KIND_CPU")
        if self.device not in ("CPU", "AUTO"):
            raise TargetError(f"intel target: OpenVINO device {self.device!r} is not one of ('CPU', 'AUTO')")


@dataclass(frozen=True)
class NvidiaGpuTarget(TargetProfile):
    """Discrete NVIDIA GPU: native TensorRT plan or ONNX Runtime with the TensorRT accelerator; CuPy preprocessing."""

    name: str = "nvidia-gpu"
    detector_engine: str = "onnxruntime_onnx"
    instance_kind: str = "KIND_GPU"
    precision: str = "fp16"
    gpus: tuple[int, ...] = field(default=(0,))
    max_workspace_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.python_detector:
            raise TargetError(f"{self.name}: GPU targets serve the detector natively (onnxruntime_onnx or tensorrt_plan)")
        if not self.on_gpu or not self.gpus:
            raise TargetError(f"{self.name}: GPU targets need KIND_GPU instances and at least one GPU id")
        if self.max_workspace_bytes <= 0:
            raise TargetError(f"{self.name}: max_workspace_bytes must be positive")


@dataclass(frozen=True)
class JetsonTarget(NvidiaGpuTarget):
    """Jetson (integrated GPU, shared memory): FP16, a small TensorRT workspace, single instances."""

    name: str = "jetson"
    max_batch_size: int = 4
    max_workspace_bytes: int = 256 << 20


TARGET_PROFILES: dict[str, type[TargetProfile]] = {
    profile.name: profile for profile in (CpuTarget, IntelTarget, NvidiaGpuTarget, JetsonTarget)
}
# The deployment targets. Every other list of targets (spec validation, CLI choices, bundles, variants) is this
# one or derived from it.
TARGETS: tuple[str, ...] = tuple(TARGET_PROFILES)
GPU_TARGETS = tuple(name for name, profile in TARGET_PROFILES.items() if profile.instance_kind == "KIND_GPU")
ONNX_TARGETS = tuple(name for name, profile in TARGET_PROFILES.items()  # targets that serve an ONNX model file
                     if profile.detector_engine in ("python_onnxruntime", "onnxruntime_onnx"))
OPENVINO_TARGETS = tuple(name for name, profile in TARGET_PROFILES.items()
                         if profile.detector_engine == "python_openvino")


def make_target(name: str, **overrides: object) -> TargetProfile:
    """The profile for a target name, with None-valued overrides ignored."""
    try:
        cls = TARGET_PROFILES[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known: {sorted(TARGET_PROFILES)}") from None
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except TypeError as exc:
        raise TargetError(f"{name}: {exc}") from exc
