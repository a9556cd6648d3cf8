"""What every ONNX Runtime variant builder shares: the model file name, the targets, session options, the atomic
publishing of a build folder, the run check before publishing, version and hash records.

The builders themselves: ort_variants (FP32, INT8), ort_fp16 (FP16); graph analysis: ort_graph; the graph
rewrites of the fast INT8 recipe: ort_int8_rewrites.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from backends.common.files import sha256_file
from builder.errors import BuilderError
from builder.targets import GPU_TARGETS, ONNX_TARGETS

MODEL_FILE = "model.onnx"
FP32_TARGETS = ONNX_TARGETS  # an FP32 ONNX model serves on every target that runs ONNX

__all__ = ["MODEL_FILE", "FP32_TARGETS", "GPU_TARGETS", "QuantizationError", "sha256_file", "ort_versions", "staged",
           "session_options", "check_runs", "collect_warnings", "input_names", "zero_feed"]


class QuantizationError(BuilderError):
    """ONNX Runtime could not quantize or optimize the model."""


def ort_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


@contextlib.contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside out_dir; on success it replaces out_dir, on any error it is deleted."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        yield stage
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def session_options(level, threads: int = 1, optimized_path: Path | None = None):
    """Explicit threads (intra `threads`, inter 1, sequential) at graph optimization `level`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = level
    options.log_severity_level = 3  # the NCHWc "hardware specific" notice is expected when we count kernels
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def check_runs(path: Path, feed: dict[str, np.ndarray] | None = None) -> None:
    """Refuse to publish a model ONNX Runtime cannot load, or (given a sample input) cannot run, on CPU.

    Loading is not enough: some quantized graphs load and then fail in the kernel (e.g. uint8 per-channel
    weights where ORT's quantizer gives an all-zero channel zero point 0 and the others 127).
    """
    import onnxruntime as ort

    options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 4  # the failure is raised below with ORT's message; no duplicate log line
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if feed is not None:
            session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises several Fail/InvalidGraph/RuntimeException types
        raise QuantizationError(f"ONNX Runtime cannot {'run' if feed is not None else 'load'} the built model: "
                                f"{str(exc).strip().splitlines()[0]}") from exc


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """ORT's quantizer warns through the root logger (e.g. "Quantized bias ... exceeds the range of a int32");
    keep the first line of each, once, for the variant record."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            line = record.getMessage().strip().splitlines()[0][:300] if record.getMessage().strip() else ""
            if line and line not in messages:
                messages.append(line)

    handler = Collect(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


def input_names(path: Path) -> list[str]:
    """The model's real inputs (graph inputs that are not initializers)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def zero_feed(path: Path) -> dict[str, np.ndarray]:
    """Zeros for every input of the model (dynamic dimensions as 1): enough to prove it runs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    feed = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
        feed[value.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return feed
