"""TensorRT plans (FP16, INT8) for nvidia-gpu / jetson targets.

A plan is specific to the GPU and TensorRT version that built it, so it is built on the device (or an
identical one). Where TensorRT or a GPU is missing this says so and builds nothing.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from builder.errors import TargetError
from builder.optimize.calibration import CalibrationSet
from builder.optimize.variants import Variant
from builder.targets import GPU_TARGETS

PLAN_PRECISIONS = ("fp16", "int8")


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA device are usable here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed here (pip package `tensorrt`, or the TensorRT in the Triton/JetPack image)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:  # noqa: BLE001 - cupy missing or no driver: both mean no GPU to build on
        return f"no usable CUDA device ({type(exc).__name__}: {exc})"
    return None


def _entropy_calibrator(calibration: CalibrationSet, cache: Path):
    import cupy
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self._batches = iter(calibration.batches())
            self._device = None

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # noqa: ARG002 - TensorRT's signature
            batch = next(self._batches, None)
            if batch is None:
                return None
            self._device = cupy.asarray(np.ascontiguousarray(batch, dtype=np.float32))
            return [int(self._device.data.ptr)]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_tensorrt(source: Path, out_dir: Path, precision: str, *, calibration: CalibrationSet | None = None,
                   workspace_bytes: int = 1 << 30, name: str | None = None) -> Variant:
    """Build model.plan from an ONNX model. INT8 uses an entropy calibrator over `calibration`, unless the
    ONNX graph is already quantized (QDQ), in which case TensorRT takes its scales from the graph."""
    if precision not in PLAN_PRECISIONS:
        raise TargetError(f"TensorRT precision {precision!r} is not one of {PLAN_PRECISIONS}")
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TargetError(f"cannot build a TensorRT plan on this machine: {reason}. Build it on the GPU device "
                          f"(or serve the onnxruntime_onnx engine with the TensorRT accelerator, which builds at load)")
    import onnx
    import tensorrt as trt

    is_qdq = any(node.op_type == "QuantizeLinear" for node in onnx.load(str(source), load_external_data=False).graph.node)
    if precision == "int8" and not is_qdq and calibration is None:
        raise TargetError("INT8 TensorRT needs calibration images or a QDQ-quantized ONNX model")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(source).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TargetError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.set_flag(trt.BuilderFlag.FP16)
    with tempfile.TemporaryDirectory(prefix=".trt-", dir=Path(out_dir).parent) as tmp:
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not is_qdq:
                config.int8_calibrator = _entropy_calibrator(calibration, Path(tmp) / "calibration.cache")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TargetError("TensorRT failed to build the engine; see its log above")
        staged = Path(tmp) / "model.plan"
        staged.write_bytes(bytes(serialized))
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        shutil.move(str(staged), out_dir / "model.plan")
    options = {"precision": precision, "from_qdq": is_qdq, "workspace_bytes": workspace_bytes,
               "tensorrt": trt.__version__, "calibration_sha256": calibration.sha256 if calibration else None}
    return Variant(name or f"trt-{precision}", "tensorrt", precision, out_dir / "model.plan", options, GPU_TARGETS)
