"""ONNX Runtime variants of the source model: FP32 (offline-optimized), INT8 (static quantization), FP16.

Everything here is ONNX Runtime's (and onnxconverter-common's) own tooling, driven with recorded options.
See docs/INT8.md for what INT8 does and does not buy on x86 CPUs.


- build_fp32: ORT's offline graph optimization (SessionOptions.optimized_model_filepath) at ORT_ENABLE_BASIC,
  the level whose output is portable across CPUs (higher levels write hardware-specific NCHWc/NHWC kernels).
- build_int8: quant_pre_process (symbolic shape inference + ORT BASIC optimization), then quantize_static with a
  CalibrationDataReader over the calibration tensors (preprocessed by the server's own function).
- build_fp16: convert_float_to_float16(keep_io_types=True) for the GPU targets, with the decode tail kept in
  float32: onnxconverter-common's, or where ORT cannot run its output, the copy ONNX Runtime ships and maintains.
- quantized_op_counts: what the file holds and what ORT really executes after its own graph optimization.

Every builder writes into a temporary folder beside out_dir and moves the finished folder into place, so
out_dir is either the complete previous content, the complete new variant, or absent; never half-written.
The builders write only the model file; the caller records it with variants.save_variant.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from builder.errors import BuilderError
from builder.optimize.calibration import CalibrationError, CalibrationSet
from builder.optimize.variants import Variant

MODEL_FILE = "model.onnx"
FP32_TARGETS = ("cpu", "nvidia-gpu", "jetson")
GPU_TARGETS = ("nvidia-gpu", "jetson")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("uint8", "int8")

# Ops that stop the backward walk of default_head_exclusions: the last learned layers before the decode.
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Integer kernels: what a QDQ graph becomes once ORT fuses DQ -> op -> Q, or what QOperator writes directly.
_INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool",
                "QLinearConcat", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean")
_FLOAT_CONV_OPS = ("Conv", "FusedConv", "ConvTranspose")


class QuantizationError(BuilderError):
    """ONNX Runtime could not quantize or optimize the model."""


# --------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class QuantOptions:
    """How build_int8 quantizes; every field is recorded in the variant's options.

    calibration: ORT CalibrationMethod (minmax | entropy | percentile); percentile: its cut for `percentile`.
    per_channel: per-output-channel weight scales (per-tensor when False).
    symmetric_activations: zero point at the middle of the activation type (TensorRT needs int8 + symmetric).
    exclude_nodes / exclude_op_types: kept in float (mixed precision), e.g. default_head_exclusions().
    quant_format: qdq (QuantizeLinear/DequantizeLinear pairs; ORT fuses them into integer kernels) or
        qoperator (QLinearConv... written directly).
    activation_type / weight_type: uint8 | int8. U8S8 (uint8 activations, int8 weights) is the combination
        the x86 VNNI kernels take directly; S8U8 is not supported by ORT.
    reduce_range: 7-bit weights (avoids vpmaddubsw saturation on AVX2/AVX-512 machines without VNNI).
    """

    calibration: str = "entropy"
    per_channel: bool = True
    symmetric_activations: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    quant_format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    percentile: float = 99.999

    def __post_init__(self) -> None:
        for name in ("exclude_nodes", "exclude_op_types"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"QuantOptions.{name} must be a tuple of names, got {value!r}")
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"QuantOptions.{name} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(sorted(set(value))))  # order-free: same set, same name
        choices = {"calibration": CALIBRATION_METHODS, "quant_format": QUANT_FORMATS,
                   "activation_type": QUANT_TYPES, "weight_type": QUANT_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"QuantOptions.{name} {getattr(self, name)!r} is not one of {allowed}")
        for name in ("per_channel", "symmetric_activations", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantOptions.percentile must be in (50, 100], got {self.percentile!r}")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError("ONNX Runtime does not support int8 activations with uint8 weights (S8U8)")

    @property
    def name(self) -> str:
        """Filesystem-safe and unique per option set, e.g. int8-entropy-pc, int8-minmax-pt-qop-s8-rr-x3f2a9c1b."""
        calibration = self.calibration
        if calibration == "percentile" and self.percentile != 99.999:
            calibration = f"p{self.percentile:g}"
        parts = ["int8", calibration, "pc" if self.per_channel else "pt"]
        if self.quant_format == "qoperator":
            parts.append("qop")
        if self.activation_type == "int8":
            parts.append("s8")
        if self.weight_type == "uint8":
            parts.append("wu8")
        if self.symmetric_activations:
            parts.append("sym")
        if self.reduce_range:
            parts.append("rr")
        if self.exclude_nodes or self.exclude_op_types:
            key = "\n".join(self.exclude_nodes) + "\0" + "\n".join(self.exclude_op_types)
            parts.append("x" + hashlib.sha256(key.encode()).hexdigest()[:8])
        return "-".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude_nodes"] = list(self.exclude_nodes)
        data["exclude_op_types"] = list(self.exclude_op_types)
        return data


# --------------------------------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _ort_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
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


def _session_options(level, threads: int = 1, optimized_path: Path | None = None):
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


def _check_runs(path: Path, feed: dict[str, np.ndarray] | None = None) -> None:
    """Refuse to publish a model ONNX Runtime cannot load, or (given a sample input) cannot run, on CPU.

    Loading is not enough: some quantized graphs load and then fail in the kernel (e.g. uint8 per-channel
    weights where ORT's quantizer gives an all-zero channel zero point 0 and the others 127).
    """
    import onnxruntime as ort

    options = _session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 4  # the failure is raised below with ORT's message; no duplicate log line
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if feed is not None:
            session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises several Fail/InvalidGraph/RuntimeException types
        raise QuantizationError(f"ONNX Runtime cannot {'run' if feed is not None else 'load'} the built model: "
                                f"{str(exc).strip().splitlines()[0]}") from exc


# --------------------------------------------------------------------------------------------------- FP32


def build_fp32(source: Path, out_dir: Path) -> Variant:
    """The source graph after ORT's portable (BASIC) offline optimizations: constant folding, redundant-node
    removal, Conv+BN/Add/Mul fusion. Runs anywhere ORT runs; higher levels are applied at session load."""
    import onnxruntime as ort

    source, out_dir = Path(source), Path(out_dir)
    with _staged(out_dir) as stage:
        target = stage / MODEL_FILE
        try:
            ort.InferenceSession(str(source), _session_options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                                               optimized_path=target),
                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise QuantizationError(f"ONNX Runtime cannot optimize {source}: {exc}") from exc
        if not target.is_file():
            raise QuantizationError(f"ONNX Runtime wrote no optimized model for {source}")
        sha = _sha256(target)
    options = {"optimization_level": "ORT_ENABLE_BASIC", "source_sha256": _sha256(source), "sha256": sha,
               **_ort_versions()}
    return Variant("fp32", "onnxruntime", "fp32", out_dir / MODEL_FILE, options, FP32_TARGETS)


# --------------------------------------------------------------------------------------------------- INT8


@contextlib.contextmanager
def _collect_warnings() -> Iterator[list[str]]:
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


def _reader(calibration: CalibrationSet, input_name: str):
    """A CalibrationDataReader over the calibration tensors (each [1, ...] float32, the model input)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration.batches())

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

        def __len__(self) -> int:
            return len(calibration)

    return Reader()


def _input_names(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _op_types_to_quantize(exclude: tuple[str, ...]) -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(exclude))


def _effective_calibration(options: QuantOptions) -> str:
    """What quantize_static really computes for options.calibration (ORT 1.22).

    quantize_static cannot pass num_bins to the EntropyCalibrater, which then uses 128 histogram bins and 128
    quantized bins: the KL search has a single candidate, the whole histogram, clipped to the observed min/max.
    The result is the min/max range: on the fixture detector the entropy and minmax models are byte-identical.
    """
    if options.calibration == "entropy":
        return "minmax-equivalent (ORT quantize_static entropy: 128 bins = 128 quantized bins, one KL candidate)"
    if options.calibration == "percentile":
        return f"percentile {options.percentile:g} of |x| (2048-bin histogram), clipped to the observed min/max"
    return "minmax"


def int8_targets(options: QuantOptions) -> tuple[str, ...]:
    """CPU always; TensorRT (through ORT's TensorRT EP) also takes a QDQ graph with symmetric int8 activations."""
    if options.quant_format == "qdq" and options.activation_type == "int8" and options.symmetric_activations:
        return ("cpu", *GPU_TARGETS)
    return ("cpu",)


def build_int8(source: Path, out_dir: Path, calibration: CalibrationSet, input_name: str,
               options: QuantOptions = QuantOptions()) -> Variant:
    """Static INT8 quantization with ORT: quant_pre_process, then quantize_static over the calibration set."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out_dir = Path(source), Path(out_dir)
    if not isinstance(options, QuantOptions):
        raise BuilderError(f"options must be QuantOptions, got {type(options).__name__}")
    if len(calibration) == 0:
        raise CalibrationError("INT8 calibration needs at least one image")
    inputs = _input_names(source)
    if input_name not in inputs:
        raise BuilderError(f"{source.name} has no input {input_name!r}; its inputs: {inputs}")
    bad = [i for i, t in enumerate(calibration.tensors) if t.dtype != np.float32]
    if bad:
        raise CalibrationError(f"calibration tensors must be float32 model inputs; tensor(s) {bad} are not")

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration]
    extra_options: dict[str, Any] = {"ActivationSymmetric": options.symmetric_activations, "WeightSymmetric": True}
    if options.symmetric_activations:
        extra_options["CalibTensorRangeSymmetric"] = True
    if options.calibration == "percentile":
        extra_options["CalibPercentile"] = float(options.percentile)
    op_types = _op_types_to_quantize(options.exclude_op_types)
    # Only names that exist: ORT silently ignores unknown ones, which would hide a typo in a mixed-precision list.
    import onnx

    node_names = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node}
    unknown = sorted(set(options.exclude_nodes) - node_names)
    if unknown:
        raise BuilderError(f"exclude_nodes names no node of {source.name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")

    with _staged(out_dir) as stage:
        work = stage / ".work"
        work.mkdir()
        prepared = work / "preprocessed.onnx"
        target = stage / MODEL_FILE
        try:
            # the calibrators print progress lines; the quantizer's warnings go into the record
            with contextlib.redirect_stdout(io.StringIO()), _collect_warnings() as ort_warnings:
                quant_pre_process(str(source), str(prepared))
                prepared_names = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node}
                quantize_static(
                    str(prepared), str(target), _reader(calibration, input_name),
                    quant_format=QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=op_types,
                    per_channel=options.per_channel,
                    reduce_range=options.reduce_range,
                    activation_type=_quant_type(options.activation_type),
                    weight_type=_quant_type(options.weight_type),
                    nodes_to_exclude=list(options.exclude_nodes),
                    calibrate_method=method,
                    calibration_providers=["CPUExecutionProvider"],
                    extra_options=extra_options,
                )
        except BuilderError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises plain ValueError/RuntimeError/Fail
            raise QuantizationError(f"ONNX Runtime could not quantize {source.name} ({options.name}): "
                                    f"{type(exc).__name__}: {exc}") from exc
        shutil.rmtree(work)
        if not target.is_file():
            raise QuantizationError(f"ONNX Runtime wrote no quantized model for {source.name}")
        _check_runs(target, {input_name: np.ascontiguousarray(calibration.tensors[0], dtype=np.float32)})
        sha = _sha256(target)
        executed = executed_graph(target)
        counts = {"file": _count(onnx.load(str(target)).graph), "executed": {**_count(executed), "level": "ORT_ENABLE_ALL"}}
        requantized = _requantized_by_ort(executed, options.exclude_nodes, source)

    record = {
        **options.as_dict(),
        "calibration_effective": _effective_calibration(options),
        "calibration_sha256": calibration.sha256,
        "calibration_count": len(calibration),
        "calibration_images": [p.name for p in calibration.paths],
        "input_name": input_name,
        # fused or folded away by quant_pre_process (e.g. a Mul folded into its Conv): nothing left to keep float
        "exclude_nodes_gone_after_preprocess": sorted(set(options.exclude_nodes) - prepared_names),
        # excluded, yet run as integer kernels: ORT re-quantizes a lone float Conv between Q/DQ at load
        "exclusions_requantized_by_ort": requantized,
        "ort_extra_options": extra_options,
        "ort_warnings": ort_warnings,
        "op_types_to_quantize": op_types,
        "source_sha256": _sha256(source),
        "sha256": sha,
        "quantized_ops": counts,
        **_ort_versions(),
    }
    return Variant(options.name, "onnxruntime", "int8", out_dir / MODEL_FILE, record, int8_targets(options))


# --------------------------------------------------------------------------------------------------- FP16


def _zero_feed(path: Path) -> dict[str, np.ndarray]:
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


def _convert_fp16(source: Path, target: Path, block: list[str]) -> dict[str, Any]:
    """convert_float_to_float16(keep_io_types=True) with onnxconverter-common; if ORT cannot load or run its
    output, the same converter as shipped (and maintained) inside ONNX Runtime, onnxruntime.transformers.float16.

    onnxconverter-common 1.16 mistypes graphs whose outputs are also consumed inside the graph (this detector's
    keypoints/wh outputs feed the decode): ORT refuses the result with a type error.
    """
    import onnx
    from onnxconverter_common import float16 as occ_float16
    from onnxruntime.transformers import float16 as ort_float16

    failures = []
    for name, convert in (("onnxconverter_common.float16", occ_float16.convert_float_to_float16),
                          ("onnxruntime.transformers.float16", ort_float16.convert_float_to_float16)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "float32 number ... will be truncated" per tiny weight
                model = convert(onnx.load(str(source)), keep_io_types=True, node_block_list=block)
            onnx.save(model, str(target))
            _check_runs(target, _zero_feed(target))
            return {"converter": name, "converter_failures": failures}
        except Exception as exc:  # noqa: BLE001 - try the next converter, report all if none works
            failures.append(f"{name}: {str(exc).strip().splitlines()[0][:300]}")
            target.unlink(missing_ok=True)
    raise QuantizationError(f"float16 conversion of {source.name} failed: " + " | ".join(failures))


def build_fp16(source: Path, out_dir: Path) -> Variant:
    """Float16 weights and activations for GPU targets, float32 inputs and outputs (keep_io_types).

    The decode tail (default_head_exclusions) stays float32: it casts TopK's flat indices (up to H*W*C,
    1.3 million for this detector) to float, which float16 cannot hold above 65504.
    """
    source, out_dir = Path(source), Path(out_dir)
    tail = list(default_head_exclusions(source))
    with _staged(out_dir) as stage:
        target = stage / MODEL_FILE
        used = _convert_fp16(source, target, tail)
        sha = _sha256(target)
    options = {"keep_io_types": True, "float32_nodes": tail, **used, "source_sha256": _sha256(source), "sha256": sha,
               "onnxconverter_common": _package_version("onnxconverter-common"), **_ort_versions()}
    return Variant("fp16", "onnxruntime", "fp16", out_dir / MODEL_FILE, options, GPU_TARGETS)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------------- analysis


def _count(graph) -> dict[str, Any]:
    """Q/DQ, integer-kernel and float-conv counts of one graph (main graph; this detector has no subgraphs)."""
    ops = Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    float_convs = 0
    for node in graph.node:
        if node.op_type not in _FLOAT_CONV_OPS:
            continue
        # In a QDQ file a Conv fed by DequantizeLinear is a quantized Conv waiting for ORT's fusion.
        fed = [producers.get(name) for name in node.input[:2]]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in fed):
            float_convs += 1
    integer = {op: ops[op] for op in _INTEGER_OPS if ops.get(op)}
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "integer_ops": integer,
        "integer_total": sum(integer.values()),
        "float_conv": float_convs,
        "nodes": sum(ops.values()),
    }


_LEVELS = ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def executed_graph(path: Path, level: str = "ORT_ENABLE_ALL"):
    """The graph ONNX Runtime runs on this CPU: its optimized model at `level`, through a temporary file."""
    import onnx
    import onnxruntime as ort

    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    with tempfile.TemporaryDirectory(prefix="ort-opt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), _session_options(getattr(ort.GraphOptimizationLevel, level), optimized_path=optimized),
                             providers=["CPUExecutionProvider"])
        return onnx.load(str(optimized)).graph


def quantized_op_counts(path: Path, level: str = "ORT_ENABLE_ALL") -> dict[str, Any]:
    """What is quantized in the file, and what ORT actually executes.

    file: counts over the saved graph. executed: the same counts over the graph ORT runs on this CPU (its
    optimized model at `level`, saved to a temporary file): with QDQ, ORT fuses DequantizeLinear -> Conv ->
    QuantizeLinear into QLinearConv, so integer kernels show up there; Q/DQ left there are real conversions.
    """
    import onnx

    path = Path(path)
    file_counts = _count(onnx.load(str(path), load_external_data=False).graph)
    executed = _count(executed_graph(path, level))
    executed["level"] = level
    return {"file": file_counts, "executed": executed}


def _requantized_by_ort(graph, excluded: tuple[str, ...], source: Path) -> list[str]:
    """Excluded Conv/Gemm nodes that ORT nevertheless runs as integer kernels.

    ORT's WeightBiasQuantization transformer (BASIC level and up) gives a float-weight Conv whose input comes from
    DequantizeLinear per-tensor int8 weights, and the QDQ fusion then makes it a QLinearConv: excluding one Conv
    in the middle of a quantized region does not always keep it float (ORT 1.22: the bias-less separable
    depthwise convs of the fixture's head are re-quantized, convs with a bias stay float).
    """
    import onnx

    compute = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node
               if n.op_type in _COMPUTE_OPS and n.name in set(excluded)}
    integer = [n.name for n in graph.node if n.op_type in _INTEGER_OPS]
    return sorted(name for name in compute if any(i == name or i.startswith(name + "_token") for i in integer))


def default_head_exclusions(source: Path) -> tuple[str, ...]:
    """Nodes after the last learned layers: walk back from every graph output, stopping at Conv/Gemm/MatMul.

    For a detector this is the decode tail: the heatmap activation, peak picking (MaxPool/Equal), TopK,
    Gather and the box arithmetic. Sorted names, for QuantOptions.exclude_nodes (kept float in INT8) and
    the float16 block list.
    """
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output if o}
    seen: set[str] = set()
    tail: list[str] = []
    stack = [o.name for o in graph.output]
    visited_tensors: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in visited_tensors:
            continue
        visited_tensors.add(tensor)
        node = producers.get(tensor)
        if node is None or node.op_type in _COMPUTE_OPS:
            continue
        key = node.name or f"{node.op_type}:{node.output[0]}"
        if key in seen:
            continue
        seen.add(key)
        if not node.name:
            raise BuilderError(f"{Path(source).name}: a {node.op_type} node of the output tail has no name; "
                               "name the graph's nodes to exclude them from quantization")
        tail.append(node.name)
        stack.extend(i for i in node.input if i)
    return tuple(sorted(tail))
