"""ONNX Runtime variants of the source model: FP32 (offline-optimized) and INT8 (static quantization).

Everything here is ONNX Runtime's own tooling, driven with recorded options, plus the three additions of the
fast INT8 recipe (FAST_INT8, builder/optimize/ort_int8_rewrites.py). See docs/INT8.md for what INT8 does and does
not buy on x86 CPUs.

- build_fp32: ORT's offline graph optimization (SessionOptions.optimized_model_filepath) at ORT_ENABLE_BASIC,
  the level whose output is portable across CPUs (higher levels write hardware-specific NCHWc/NHWC kernels).
- build_int8: quant_pre_process (symbolic shape inference + ORT BASIC optimization), then quantize_static with a
  CalibrationDataReader over the calibration tensors (preprocessed by the server's own function).
- build_fp16 (ort_fp16), quantized_op_counts / executed_graph / default_head_exclusions (ort_graph) are
  re-exported here: this module is the entry point for ONNX Runtime variants.

Every builder writes into a temporary folder beside out_dir and moves the finished folder into place, so
out_dir is either the complete previous content, the complete new variant, or absent; never half-written.
The builders write only the model file; the caller records it with variants.save_variant.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuilderError
from builder.optimize.calibration import CalibrationError, CalibrationSet
from builder.optimize.ort_common import (FP32_TARGETS, GPU_TARGETS, MODEL_FILE, QuantizationError, check_runs,
                                         collect_warnings, input_names, ort_versions, session_options, sha256_file,
                                         staged)
from builder.optimize.ort_fp16 import build_fp16
from builder.optimize.ort_graph import (count_ops, default_head_exclusions, executed_graph, float_resizes,
                                        quantized_op_counts, requantized_by_ort)
from builder.optimize import ort_entropy
from builder.optimize import ort_int8_rewrites as rewrites
from builder.optimize.ort_entropy import entropy_ranges
from builder.optimize.variants import Variant

__all__ = ["MODEL_FILE", "FP32_TARGETS", "GPU_TARGETS", "CALIBRATION_METHODS", "ORT_CALIBRATION_METHODS",
           "FAST_INT8", "QuantOptions", "QuantizationError", "build_fp32", "build_int8", "build_fp16",
           "default_head_exclusions", "executed_graph", "quantized_op_counts", "int8_targets", "op_types_to_quantize"]

ORT_CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # ORT's own calibrators
# mean-quantile: NNCF's MEAN_QUANTILE activation ranges, computed here and given to ORT as overrides
CALIBRATION_METHODS = (*ORT_CALIBRATION_METHODS, "mean-quantile")
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("uint8", "int8")
ENTROPY_BINS = ort_entropy.DEFAULT_NUM_BINS


@dataclass(frozen=True)
class QuantOptions:
    """How build_int8 quantizes; every field is recorded in the variant's options.

    calibration: minmax | percentile (ORT's CalibrationMethod), entropy (ORT's KL search over ENTROPY_BINS-bin
        histograms, ort_entropy: quantize_static alone would use 128 bins, which is min/max) or mean-quantile (per
        image quantiles outlier_prob and 1 - outlier_prob of every activation, averaged over the images; NNCF's
        default-like MEAN_QUANTILE estimator). percentile: the cut for `percentile`.
    per_channel: per-output-channel weight scales (per-tensor when False).
    symmetric_activations: zero point at the middle of the activation type (TensorRT needs int8 + symmetric).
    exclude_nodes / exclude_op_types: kept in float (mixed precision), e.g. default_head_exclusions().
    quant_format: qdq (QuantizeLinear/DequantizeLinear pairs; ORT fuses them into integer kernels) or
        qoperator (QLinearConv... written directly).
    activation_type / weight_type: uint8 | int8. U8S8 (uint8 activations, int8 weights) is the combination
        the x86 VNNI kernels take directly; S8U8 is not supported by ORT.
    reduce_range: 7-bit weights (avoids vpmaddubsw saturation on AVX2/AVX-512 machines without VNNI); which
        classes compute a build exactly, and what each class gets: int8_classes.
    float_resize: Resize nodes run in float (ORT's uint8 NHWC bilinear Resize is slow); needs mean-quantile,
        whose ranges this builder controls (ORT's calibrators give the Resize output its input's scale, and then
        ORT fuses the Resize back into uint8).
    fold_scalar_muls: multiplications by a positive scalar constant become scale changes (qdq only).
    peaks_on_logits: CenterNet's peak test (heat == MaxPool(heat), heat = Sigmoid of quantized logits) runs on the
        quantized logits, as a uint8 MaxPool (qdq only; rewrites.pool_peaks_on_logits).
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
    outlier_prob: float = rewrites.DEFAULT_OUTLIER_PROB
    float_resize: bool = False
    fold_scalar_muls: bool = False
    peaks_on_logits: bool = False

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
        for name in ("per_channel", "symmetric_activations", "reduce_range", "float_resize", "fold_scalar_muls",
                     "peaks_on_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantOptions.percentile must be in (50, 100], got {self.percentile!r}")
        if isinstance(self.outlier_prob, bool) or not isinstance(self.outlier_prob, (int, float)) \
                or not 0.0 <= self.outlier_prob <= 0.01:
            raise ValueError(f"QuantOptions.outlier_prob must be in [0, 0.01], got {self.outlier_prob!r}")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError("ONNX Runtime does not support int8 activations with uint8 weights (S8U8)")
        if self.float_resize and self.calibration != "mean-quantile":
            raise ValueError("QuantOptions.float_resize needs calibration='mean-quantile' (with ORT's calibrators the "
                             "Resize output shares its input's scale and ORT runs the uint8 Resize anyway)")
        if (self.float_resize or self.fold_scalar_muls or self.peaks_on_logits) and self.quant_format != "qdq":
            raise ValueError("QuantOptions.float_resize / fold_scalar_muls / peaks_on_logits rewrite Q/DQ pairs: "
                             "quant_format must be 'qdq'")

    @property
    def name(self) -> str:
        """Filesystem-safe and unique per option set, e.g. int8-entropy-pc, int8-minmax-pt-qop-s8-rr-x3f2a9c1b."""
        calibration = self.calibration
        if calibration == "percentile" and self.percentile != 99.999:
            calibration = f"p{self.percentile:g}"
        if calibration == "mean-quantile" and self.outlier_prob != rewrites.DEFAULT_OUTLIER_PROB:
            calibration = f"mean-quantile{self.outlier_prob:g}"
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
        if self.float_resize:
            parts.append("resizef32")
        if self.fold_scalar_muls:
            parts.append("mulfold")
        if self.peaks_on_logits:
            parts.append("peaklogits")
        if self.exclude_nodes or self.exclude_op_types:
            key = "\n".join(self.exclude_nodes) + "\0" + "\n".join(self.exclude_op_types)
            parts.append("x" + hashlib.sha256(key.encode()).hexdigest()[:8])
        return "-".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude_nodes"] = list(self.exclude_nodes)
        data["exclude_op_types"] = list(self.exclude_op_types)
        return data


# The fastest INT8 found on this CPU that keeps the detections (docs/INT8.md); add the decode tail to
# exclude_nodes, as `edgestack optimize` does: QuantOptions(**FAST_INT8, exclude_nodes=default_head_exclusions(m)).
FAST_INT8: dict[str, Any] = {"calibration": "mean-quantile", "float_resize": True, "fold_scalar_muls": True,
                             "peaks_on_logits": True}


# --------------------------------------------------------------------------------------------------- FP32


def build_fp32(source: Path, out_dir: Path) -> Variant:
    """The source graph after ORT's portable (BASIC) offline optimizations: constant folding, redundant-node
    removal, Conv+BN/Add/Mul fusion. Runs anywhere ORT runs; higher levels are applied at session load."""
    import onnxruntime as ort

    source, out_dir = Path(source), Path(out_dir)
    with staged(out_dir) as stage:
        target = stage / MODEL_FILE
        try:
            ort.InferenceSession(str(source), session_options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                                              optimized_path=target),
                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise QuantizationError(f"ONNX Runtime cannot optimize {source}: {exc}") from exc
        if not target.is_file():
            raise QuantizationError(f"ONNX Runtime wrote no optimized model for {source}")
        sha = sha256_file(target)
    options = {"optimization_level": "ORT_ENABLE_BASIC", "source_sha256": sha256_file(source), "sha256": sha,
               **ort_versions()}
    return Variant("fp32", "onnxruntime", "fp32", out_dir / MODEL_FILE, options, FP32_TARGETS)


# --------------------------------------------------------------------------------------------------- INT8


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


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def op_types_to_quantize(exclude: tuple[str, ...]) -> list[str]:
    """Every op type ORT's quantizer handles (QOperator or QDQ), minus `exclude`."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QLinearOpsRegistry) | set(QDQRegistry)) - set(exclude))


def _effective_calibration(options: QuantOptions) -> str:
    """What quantize_static really computes for options.calibration (ORT 1.22).

    entropy: ORT's EntropyCalibrater histograms with ENTROPY_BINS bins and its KL search (ort_entropy), given to
    quantize_static as overrides; through quantize_static itself it would get 128 bins = 128 quantized bins, one
    KL candidate, which is min/max (byte-identical models on the fixture detector).
    """
    if options.calibration == "entropy":
        return (f"KL divergence over {ENTROPY_BINS}-bin histograms, {ort_entropy.DEFAULT_QUANTIZED_BINS} quantized bins "
                "(ORT's EntropyCalibrater search), clipped to the observed min/max (TensorQuantOverrides)")
    if options.calibration == "percentile":
        return f"percentile {options.percentile:g} of |x| (2048-bin histogram), clipped to the observed min/max"
    if options.calibration == "mean-quantile":
        return (f"mean over images of the per-image {options.outlier_prob:g} / {1 - options.outlier_prob:g} quantiles "
                "(TensorQuantOverrides for every float node output; the float tail's inputs take the extremes)")
    return "minmax"


def int8_targets(options: QuantOptions) -> tuple[str, ...]:
    """CPU always; TensorRT (through ORT's TensorRT EP) also takes a QDQ graph with symmetric int8 activations."""
    if options.quant_format == "qdq" and options.activation_type == "int8" and options.symmetric_activations:
        return ("cpu", *GPU_TARGETS)
    return ("cpu",)


def _check_arguments(source: Path, calibration: CalibrationSet, input_name: str, options: QuantOptions) -> None:
    import onnx

    if not isinstance(options, QuantOptions):
        raise BuilderError(f"options must be QuantOptions, got {type(options).__name__}")
    if len(calibration) == 0:
        raise CalibrationError("INT8 calibration needs at least one image")
    inputs = input_names(source)
    if input_name not in inputs:
        raise BuilderError(f"{source.name} has no input {input_name!r}; its inputs: {inputs}")
    bad = [i for i, t in enumerate(calibration.tensors) if t.dtype != np.float32]
    if bad:
        raise CalibrationError(f"calibration tensors must be float32 model inputs; tensor(s) {bad} are not")
    # Only names that exist: ORT silently ignores unknown ones, which would hide a typo in a mixed-precision list.
    node_names = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node}
    unknown = sorted(set(options.exclude_nodes) - node_names)
    if unknown:
        raise BuilderError(f"exclude_nodes names no node of {source.name}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


def _quantize(prepared: Path, target: Path, calibration: CalibrationSet, input_name: str,
              options: QuantOptions) -> dict[str, Any]:
    """quantize_static of the prepared model into target, then the recipe's rewrites; what was done, for the record."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    extra_options: dict[str, Any] = {"ActivationSymmetric": options.symmetric_activations, "WeightSymmetric": True}
    if options.symmetric_activations:
        extra_options["CalibTensorRangeSymmetric"] = True
    if options.calibration == "percentile":
        extra_options["CalibPercentile"] = float(options.percentile)
    done: dict[str, Any] = {"ort_extra_options": dict(extra_options)}
    model = onnx.load(str(prepared))
    exclude = list(options.exclude_nodes)
    if options.float_resize:
        done["float_resize_nodes"] = rewrites.resize_nodes(model)
        exclude += [n for n in done["float_resize_nodes"] if n not in exclude]
    done["op_types_to_quantize"] = op_types_to_quantize(options.exclude_op_types)
    ranges = None
    if options.calibration == "mean-quantile":
        done["float_tail_inputs"] = rewrites.float_tail_inputs(model, options.exclude_nodes)
        ranges = rewrites.mean_quantile_ranges(prepared, calibration.tensors, input_name, options.outlier_prob,
                                               extremes=done["float_tail_inputs"])
        if options.float_resize:
            done["resize_ranges_widened"] = rewrites.separate_resize_ranges(ranges, model, done["float_resize_nodes"])
    elif options.calibration == "entropy":
        ranges = entropy_ranges(prepared, ({input_name: np.ascontiguousarray(t, np.float32)} for t in calibration.tensors),
                                done["op_types_to_quantize"], ENTROPY_BINS)
    if ranges is not None:
        extra_options["TensorQuantOverrides"] = rewrites.range_overrides(ranges)
        done["range_overrides"] = {"tensors": len(ranges), "sha256": hashlib.sha256(
            repr(sorted(ranges.items())).encode()).hexdigest()}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.MinMax,
              "percentile": CalibrationMethod.Percentile,
              "mean-quantile": CalibrationMethod.MinMax}[options.calibration]  # entropy, mean-quantile: all overridden
    quantize_static(
        str(prepared), str(target), _reader(calibration, input_name),
        quant_format=QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=done["op_types_to_quantize"],
        per_channel=options.per_channel,
        reduce_range=options.reduce_range,
        activation_type=_quant_type(options.activation_type),
        weight_type=_quant_type(options.weight_type),
        nodes_to_exclude=exclude,
        calibrate_method=method,
        calibration_providers=["CPUExecutionProvider"],
        extra_options=extra_options,
    )
    if (options.fold_scalar_muls or options.peaks_on_logits) and target.is_file():
        quantized = onnx.load(str(target))
        if options.fold_scalar_muls:
            done["folded_muls"] = rewrites.fold_scalar_muls(quantized)
        if options.peaks_on_logits:
            done["peak_pools_on_logits"] = rewrites.pool_peaks_on_logits(quantized)
        onnx.save(quantized, str(target))
    return done


def build_int8(source: Path, out_dir: Path, calibration: CalibrationSet, input_name: str,
               options: QuantOptions = QuantOptions()) -> Variant:
    """Static INT8 quantization with ORT: quant_pre_process, then quantize_static over the calibration set."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out_dir = Path(source), Path(out_dir)
    _check_arguments(source, calibration, input_name, options)
    with staged(out_dir) as stage:
        work = stage / ".work"
        work.mkdir()
        prepared = work / "preprocessed.onnx"
        target = stage / MODEL_FILE
        try:
            # the calibrators print progress lines; the quantizer's warnings go into the record
            with contextlib.redirect_stdout(io.StringIO()), collect_warnings() as ort_warnings:
                quant_pre_process(str(source), str(prepared))
                prepared_names = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node}
                done = _quantize(prepared, target, calibration, input_name, options)
        except BuilderError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises plain ValueError/RuntimeError/Fail
            raise QuantizationError(f"ONNX Runtime could not quantize {source.name} ({options.name}): "
                                    f"{type(exc).__name__}: {exc}") from exc
        shutil.rmtree(work)
        if not target.is_file():
            raise QuantizationError(f"ONNX Runtime wrote no quantized model for {source.name}")
        check_runs(target, {input_name: np.ascontiguousarray(calibration.tensors[0], dtype=np.float32)})
        sha = sha256_file(target)
        executed = executed_graph(target)
        counts = {"file": count_ops(onnx.load(str(target)).graph),
                  "executed": {**count_ops(executed, executed=True), "level": "ORT_ENABLE_ALL"}}
        if options.float_resize:
            done["resize_executed"] = float_resizes(executed)
        requantized = requantized_by_ort(executed, options.exclude_nodes, source)

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
        **done,
        "ort_warnings": ort_warnings,
        "source_sha256": sha256_file(source),
        "sha256": sha,
        "quantized_ops": counts,
        **ort_versions(),
    }
    return Variant(options.name, "onnxruntime", "int8", out_dir / MODEL_FILE, record, int8_targets(options))
