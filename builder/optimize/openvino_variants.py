"""OpenVINO IR variants (FP32, FP16, INT8 via NNCF post-training quantization) for the `intel` target.

Each build converts the source ONNX model with `openvino.convert_model`, folds the exporter's layout
transposes (fold_transposes: bit-identical outputs), writes the IR (model.xml + model.bin) into a
temporary folder beside out_dir and moves it into out_dir only once it is complete, so an interrupted
build never leaves a half-written variant behind.

INT8 (build_openvino_int8): NNCF quantizes the inputs and weights of the convolutions with statistics
from the calibration images. Kept in float through an `nncf.IgnoredScope`:
- the detection head's decoding (sigmoid, 3x3 max-pool peak test, TopK, index arithmetic, box
  assembly: postprocess_node_names), which is exact integer bookkeeping on a float heat map;
- by default (compute_only) the elementwise/data-movement ops (residual adds, hard-swish and
  squeeze-excite multiplies, concat, resize, pooling): on MobileNetV3-CenterNet they carry most of the
  quantization error and none of the speed-up;
- by default (float_depthwise) the depthwise convolutions, the most sensitive layers left.
Measured on the fixture model (5 calibration images, one thread): the default is ~2.0-2.1x ONNX
Runtime FP32 with scores ~0.04 from FP32 on average; float_depthwise=False is ~2.3x with ~0.08 (and
objects near the score threshold drop). See benchmarks/openvino_speed.py.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from builder.errors import BuilderError
from builder.optimize.calibration import CalibrationSet
from builder.optimize.variants import Variant
from builder.targets import OPENVINO_TARGETS

OPENVINO_PRECISIONS = ("fp32", "fp16")
NNCF_PRESETS = ("mixed", "performance")
IR_FILE = "model.xml"

# Ops that do the network's heavy lifting; post-processing is what lies after the last of them.
_COMPUTE_TYPES = frozenset({"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData",
                            "GroupConvolutionBackpropData"})
# Elementwise ops with a constant operand right after a convolution are its bias/scale: part of the conv.
_CONV_EPILOGUE_TYPES = frozenset({"Add", "Multiply", "Subtract"})
_NOT_NODES = frozenset({"Constant", "Parameter", "Result"})
# With compute_only, NNCF places quantizers only in front of compute ops: these stay float.
COMPUTE_ONLY_IGNORED_TYPES = ("Add", "Multiply", "Subtract", "Divide", "Maximum", "Minimum", "SquaredDifference",
                              "Concat", "Interpolate", "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2",
                              "MaxPool", "AvgPool", "MVN", "NormalizeL2")


def _convert(source: Path, outputs: Sequence[str] | None = None):
    """ov.convert_model of the ONNX file; `outputs` keeps only those output tensors (None: all)."""
    import openvino as ov

    source = Path(source)
    if not source.is_file():
        raise BuilderError(f"source model {source} does not exist")
    try:
        return ov.convert_model(str(source), **({"output": list(outputs)} if outputs else {}))
    except Exception as exc:  # noqa: BLE001 - any frontend failure is a build failure with its reason
        raise BuilderError(f"OpenVINO cannot convert {source}: {exc}") from exc


def _prepare(source: Path, outputs: Sequence[str] | None, fold: bool) -> tuple[object, dict]:
    """The converted model (transposes folded if asked) and the options that describe it."""
    model = _convert(source, outputs)
    rewrites = fold_transposes(model) if fold else 0
    options = {"source": str(Path(source).resolve()), "outputs": list(outputs) if outputs else None,
               "fold_transposes": fold, "transpose_rewrites": rewrites, **_versions()}
    return model, options


def _publish(staged: Path, out_dir: Path) -> Path:
    """Move the complete IR from the staging folder into out_dir (replacing an older one); the .xml path."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for suffix in (".xml", ".bin"):
        shutil.move(str(staged / f"model{suffix}"), out_dir / f"model{suffix}")
    return out_dir / IR_FILE


def _save(model, out_dir: Path, compress_to_fp16: bool) -> Path:
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-ov-", dir=out_dir.parent) as tmp:
        staged = Path(tmp)
        ov.save_model(model, str(staged / IR_FILE), compress_to_fp16=compress_to_fp16)
        return _publish(staged, out_dir)


def _versions() -> dict[str, str]:
    import openvino as ov

    versions = {"openvino": ov.__version__}
    try:
        import nncf

        versions["nncf"] = nncf.__version__
    except ImportError:
        pass
    return versions


def build_openvino(source: Path, out_dir: Path, precision: str = "fp32", *, outputs: Sequence[str] | None = None,
                   fold: bool = True, name: str | None = None) -> Variant:
    """Convert the ONNX model to an OpenVINO IR in out_dir (model.xml + model.bin).

    fp16 stores the weights as FP16 (halves the file; the CPU plugin decompresses them and computes at
    the runtime's inference precision). outputs: keep only these output tensors (None: all of them).
    fold: fold_transposes() on the converted graph (bit-identical outputs).
    """
    if precision not in OPENVINO_PRECISIONS:
        raise BuilderError(f"OpenVINO IR precision {precision!r} is not one of {OPENVINO_PRECISIONS} (int8: build_openvino_int8)")
    started = time.perf_counter()
    model, options = _prepare(source, outputs, fold)
    path = _save(model, out_dir, compress_to_fp16=precision == "fp16")
    options.update(compress_to_fp16=precision == "fp16", build_seconds=round(time.perf_counter() - started, 2))
    return Variant(name or f"ov-{precision}", "openvino", precision, path, options, OPENVINO_TARGETS)


# Ops that commute with a transpose of all their inputs (elementwise, no broadcasting when shapes match).
_UNARY_ELEMENTWISE = frozenset({"Convert", "Sigmoid", "Relu", "Abs", "Exp", "Log", "Negative", "Sqrt", "Tanh", "Clamp",
                                "HSigmoid", "HSwish", "Swish", "Floor", "Ceiling", "LogicalNot"})
_BINARY_ELEMENTWISE = frozenset({"Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "Multiply", "Add",
                                 "Subtract", "Divide", "Maximum", "Minimum", "LogicalAnd", "LogicalOr", "Power"})


def _permutation(node) -> tuple[int, ...] | None:
    """The constant permutation of a Transpose node, else None."""
    if node.get_type_name() != "Transpose":
        return None
    order = node.input(1).get_source_output().get_node()
    if order.get_type_name() != "Constant":
        return None
    return tuple(int(v) for v in order.get_data().reshape(-1))


def _feeds_result(output) -> bool:
    return any(t.get_node().get_type_name() == "Result" for t in output.get_target_inputs())


def _transposed_elements(model) -> int:
    total = 0
    for op in model.get_ops():
        if op.get_type_name() == "Transpose":
            shape = op.get_output_partial_shape(0)
            total += int(np.prod(shape.to_shape())) if shape.is_static else 1 << 40
    return total


def _rewrite_once(model) -> bool:
    import openvino.opset13 as ops

    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "Transpose":
            outer, inner_node = _permutation(node), node.input(0).get_source_output().get_node()
            inner = _permutation(inner_node)
            if (outer and inner and len(outer) == len(inner) and all(inner[outer[i]] == i for i in range(len(outer)))
                    and not _feeds_result(node.output(0))):
                source = inner_node.input(0).get_source_output()
                for target in list(node.output(0).get_target_inputs()):
                    target.replace_source_output(source)
                return True
            continue
        arity = 1 if kind in _UNARY_ELEMENTWISE else 2 if kind in _BINARY_ELEMENTWISE else 0
        if not arity or node.get_input_size() != arity or node.get_output_size() != 1 or _feeds_result(node.output(0)):
            continue
        producers = [node.input(i).get_source_output().get_node() for i in range(arity)]
        perms = {_permutation(p) for p in producers}
        if None in perms or len(perms) != 1:
            continue
        shapes = [node.get_input_partial_shape(i) for i in range(arity)]
        if not all(s.is_static for s in shapes) or len({tuple(s.to_shape()) for s in shapes}) != 1:
            continue
        (perm,) = perms
        targets = list(node.output(0).get_target_inputs())
        for i, producer in enumerate(producers):
            node.input(i).replace_source_output(producer.input(0).get_source_output())
        node.validate_and_infer_types()
        moved = ops.transpose(node.output(0), ops.constant(np.asarray(perm, dtype=np.int64)))
        moved.set_friendly_name(f"{node.get_friendly_name()}/transpose")
        for target in targets:
            target.replace_source_output(moved.output(0))
        return True
    return False


def fold_transposes(model, max_rewrites: int = 1000) -> int:
    """Cancel transpose pairs and sink transposes below elementwise ops, in place; the rewrite count.

    tf2onnx exports wrap NHWC ops in NCHW<->NHWC transposes; in CenterNet's head that is three
    transposes of the 128x128x80 heat map around a max-pool peak test (about a third of the INT8
    latency on one thread). Both rewrites only move data, so outputs are bit-identical. The model is
    only changed when fewer elements end up transposed; transposes that produce model outputs stay.
    """
    trial = model.clone()
    count = 0
    while count < max_rewrites and _rewrite_once(trial):
        count += 1
    trial.validate_nodes_and_infer_types()
    if count == 0 or _transposed_elements(trial) >= _transposed_elements(model):
        return 0
    count = 0
    while count < max_rewrites and _rewrite_once(model):
        count += 1
    model.validate_nodes_and_infer_types()
    return count


def _source_node(port):
    return port.get_source_output().get_node()


def _is_conv_epilogue(node) -> bool:
    """An elementwise op with one constant operand whose other operand comes (directly) from a conv."""
    if node.get_type_name() not in _CONV_EPILOGUE_TYPES:
        return False
    producers = [_source_node(p) for p in node.inputs()]
    types = [p.get_type_name() for p in producers]
    return "Constant" in types and any(t in _COMPUTE_TYPES or _is_conv_epilogue(p) for t, p in zip(types, producers)
                                       if t != "Constant")


def postprocess_node_names(model, output_names: Iterable[str] | None = None) -> list[str]:
    """Friendly names of the nodes between the last compute op (conv / matmul, with its bias) and the
    outputs named (all outputs when None): the detection head's decoding, to be kept in float.

    Walks back from each output and stops at compute ops; constants, parameters and results are left
    out (they are not quantizable nodes). Sorted, for a stable record.
    """
    wanted = None if output_names is None else set(output_names)
    results = []
    for result in model.get_results():
        names = result.input(0).get_source_output().get_names()
        if wanted is None or names & wanted:
            results.append(result)
    if wanted is not None and not results:
        known = sorted(n for r in model.get_results() for n in r.input(0).get_source_output().get_names())
        raise BuilderError(f"model has no output named {sorted(wanted)}; its outputs: {known}")
    found: dict[str, object] = {}
    stack = [_source_node(r.input(0)) for r in results]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        key = node.get_name()  # unique per node; Python wrappers are new objects on every access
        if key in seen:
            continue
        seen.add(key)
        kind = node.get_type_name()
        if kind in _COMPUTE_TYPES or _is_conv_epilogue(node) or kind in _NOT_NODES:
            continue
        found[node.get_friendly_name()] = node
        stack.extend(_source_node(p) for p in node.inputs())
    return sorted(found)


def build_openvino_int8(source: Path, out_dir: Path, calibration: CalibrationSet, *,
                        ignored_names: Sequence[str] = (), ignored_types: Sequence[str] = (),
                        ignored_patterns: Sequence[str] = (), preset: str = "mixed", subset_size: int | None = None,
                        compute_only: bool = True, float_depthwise: bool = True, float_postprocess: bool = True,
                        activation_range: str | None = None, fast_bias_correction: bool = True,
                        overflow_fix: str | None = None, outputs: Sequence[str] | None = None, fold: bool = True,
                        name: str | None = None) -> Variant:
    """Post-training INT8 quantization with NNCF over the calibration images (model-input tensors).

    compute_only: quantize only the inputs of convolutions / matmuls; elementwise and data-movement ops
        (COMPUTE_ONLY_IGNORED_TYPES: residual adds, hard-swish and squeeze-excite multiplies, concat,
        resize, pooling) stay float. On the fixture CenterNet this costs no latency and halves the
        score drift against FP32 (those quantizers are where most of the error comes from).
    float_depthwise: keep depthwise (grouped) convolutions in float. They are the layers this family of
        models (MobileNet backbones, separable heads) is most sensitive to; on the fixture CenterNet this
        halves the score drift against FP32 for ~3 ms of the ~25 ms INT8 latency (one thread).
    float_postprocess: keep the detection head's decoding in float (postprocess_node_names).
    ignored_names / ignored_types / ignored_patterns: more nodes (OpenVINO friendly names of the
        converted model; generated ones such as "Multiply_9114" change from one conversion to the next,
        so match those with a regular expression), op types, and name regexes kept in float.
    preset: NNCF's "mixed" (symmetric weights, asymmetric activations) or "performance" (symmetric both).
    activation_range: an nncf RangeEstimatorParametersSet name for activations ("minmax", "histogram",
        ...); None keeps NNCF's default.
    overflow_fix: NNCF's OverflowFix ("enable": 7-bit weights everywhere, exact on x86 CPUs without VNNI, whose
        int8 dot product saturates; "first_layer_only"; "disable"); None keeps NNCF's default (first layer only).
        builder/optimize/int8_classes.py chooses it per device class.
    subset_size: calibration images used (default: all of them). outputs / fold: as build_openvino.
    """
    import nncf

    if preset not in NNCF_PRESETS:
        raise BuilderError(f"NNCF preset {preset!r} is not one of {NNCF_PRESETS}")
    if len(calibration) == 0:
        raise BuilderError("INT8 quantization needs at least one calibration image")
    if subset_size is not None and subset_size < 1:
        raise BuilderError(f"subset_size must be at least 1, got {subset_size}")
    advanced = _advanced_parameters(activation_range, overflow_fix)
    started = time.perf_counter()
    model, options = _prepare(source, outputs, fold)
    known = {op.get_friendly_name() for op in model.get_ops()}
    missing = [n for n in ignored_names if n not in known]
    if missing:
        raise BuilderError(f"ignored_names not in the converted model: {missing}")
    patterns = list(ignored_patterns)
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise BuilderError(f"ignored pattern {pattern!r} is not a regular expression: {exc}") from exc
        if not any(regex.match(n) for n in known):
            raise BuilderError(f"ignored pattern {pattern!r} matches no node of the converted model")
    names = list(dict.fromkeys(ignored_names))
    if float_postprocess:
        names += [n for n in postprocess_node_names(model) if n not in names]
    types = list(dict.fromkeys([*ignored_types, *(COMPUTE_ONLY_IGNORED_TYPES if compute_only else ()),
                                *(("GroupConvolution",) if float_depthwise else ())]))
    scope = nncf.IgnoredScope(names=names, types=types, patterns=patterns, validate=False) if (names or types or patterns) else None
    used = min(subset_size or len(calibration), len(calibration))
    logger = logging.getLogger("nncf")  # NNCF logs a line per node it leaves out; keep warnings only
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(calibration.batches())),  # a list: NNCF iterates it more than once
            preset=nncf.QuantizationPreset(preset),
            target_device=nncf.TargetDevice.CPU,
            subset_size=used,
            fast_bias_correction=fast_bias_correction,
            ignored_scope=scope,
            advanced_parameters=advanced,
        )
    except nncf.errors.ValidationError as exc:
        raise BuilderError(f"NNCF refused the quantization settings: {exc}") from exc
    finally:
        logger.setLevel(level)
    path = _save(quantized, out_dir, compress_to_fp16=False)
    options.update({
        "preset": preset,
        "subset_size": used,
        "compute_only": compute_only,
        "float_depthwise": float_depthwise,
        "activation_range": activation_range,
        "fast_bias_correction": fast_bias_correction,
        "overflow_fix": overflow_fix,
        "float_postprocess": float_postprocess,
        "ignored_names": names,
        "ignored_types": types,
        "ignored_patterns": patterns,
        "fake_quantize_ops": sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"),
        "calibration_sha256": calibration.sha256,
        "calibration_count": len(calibration),
        "calibration_files": [p.name for p in calibration.paths],
        "build_seconds": round(time.perf_counter() - started, 2),
    })
    return Variant(name or "ov-int8", "openvino", "int8", path, options, OPENVINO_TARGETS)


def _advanced_parameters(activation_range: str | None, overflow_fix: str | None = None):
    if activation_range is None and overflow_fix is None:
        return None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    parameters = {}
    if activation_range is not None:
        known = [n.lower() for n in dir(RangeEstimatorParametersSet) if n.isupper()]
        if activation_range.lower() not in known:
            raise BuilderError(f"activation_range {activation_range!r} is not one of {known}")
        parameters["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, activation_range.upper())
    if overflow_fix is not None:
        fixes = [f.value for f in OverflowFix]
        if overflow_fix not in fixes:
            raise BuilderError(f"overflow_fix {overflow_fix!r} is not one of {fixes}")
        parameters["overflow_fix"] = OverflowFix(overflow_fix)
    return AdvancedQuantizationParameters(**parameters)
