"""NNCF's ONNX backend as an INT8 quantizer for ONNX Runtime: the exploration rows of benchmarks/int8_explore.py.

nncf.quantize(onnx.ModelProto, ...) writes a QDQ model. As written, ONNX Runtime 1.22 cannot run it on this
detector, and after the two fixes below it fuses only part of it:

- NNCF quantizes the inputs of depthwise convs per channel (its CPU hardware config allows that); ORT's
  QLinearConv / QLinearMul need one scale per activation tensor and the session fails to load ("Scale and
  Zero-point must be a scalar"). Fix: activations_quantization_params=QuantizationParameters(per_channel=False).
- NNCF writes int8 zero points for signed activations and leaves conv biases float. ORT's x86 QDQ fusion takes
  uint8 activations and an int32 bias: as written, 25 of 89 convs become QLinearConv. ort_friendly() rewrites
  int8 activation Q/DQ pairs to uint8 (zero point + 128, exact) and quantizes the biases to int32 with scale
  x_scale * w_scale (what ORT's quantizer writes): 66 of 89.
- The other 23 convs stay float: NNCF places no quantizer after a conv whose output feeds a hard-swish, a
  residual Add or a Concat (its fused patterns), and ORT needs DQ -> Conv -> Q to fuse.

Not a builder: nothing here is published as a variant (see docs/INT8.md for why).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np


def quantize(source: Path, target: Path, tensors: Sequence[np.ndarray], input_name: str, ignored: Sequence[str], *,
             preset: str = "mixed", per_channel_activations: bool = False, range_estimator: str | None = None,
             fast_bias_correction: bool = True) -> None:
    """nncf.quantize of the ONNX model (CPU target, `ignored` node names kept float), saved to target as written."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = {} if per_channel_activations else {"activations_quantization_params": QuantizationParameters(per_channel=False)}
    if range_estimator:
        advanced["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet, range_estimator.upper())
    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = nncf.quantize(
        onnx.load(str(source)), nncf.Dataset([{input_name: t} for t in tensors]),
        preset=nncf.QuantizationPreset(preset), target_device=nncf.TargetDevice.CPU, subset_size=len(tensors),
        fast_bias_correction=fast_bias_correction, ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False),
        advanced_parameters=AdvancedQuantizationParameters(**advanced) if advanced else None)
    onnx.save(model, str(target))


def ort_friendly(source: Path, target: Path) -> None:
    """uint8 activations (int8 zero point + 128, same scale: exact) and int32 conv biases, as ORT's QDQ fusion wants."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    shifted: set[str] = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zero = initializers[node.input[2]]
        if zero.data_type == onnx.TensorProto.INT8 and zero.name not in shifted:
            value = numpy_helper.to_array(zero).astype(np.int16) + 128
            zero.CopyFrom(numpy_helper.from_array(value.astype(np.uint8), zero.name))
            shifted.add(zero.name)
        if zero.name in shifted:
            for info in graph.value_info:
                if info.name == node.output[0]:
                    info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    bias_nodes = []
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        x, w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear"):
            continue
        scale = (numpy_helper.to_array(initializers[x.input[1]]) * numpy_helper.to_array(initializers[w.input[1]]))
        bias = numpy_helper.to_array(initializers[node.input[2]])
        scale = np.broadcast_to(scale.astype(np.float32).reshape(-1), bias.shape).copy()
        name = node.input[2] + "_int32"
        graph.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(bias / scale), -2**31, 2**31 - 1).astype(np.int32), name),
            numpy_helper.from_array(scale, name + "_scale"),
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), name + "_zero")])
        bias_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero"], [name + "_dq"],
                                           name=name + "_dq", axis=0))
        node.input[2] = name + "_dq"
    nodes = bias_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(target))


def build(source: Path, out_dir: Path, tensors: Sequence[np.ndarray], input_name: str, ignored: Sequence[str],
          fix_for_ort: bool = True, **nncf_options) -> Path:
    """out_dir/model.onnx: NNCF's model, rewritten by ort_friendly unless fix_for_ort is False."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = out_dir / "nncf.onnx"
    quantize(source, written, tensors, input_name, ignored, **nncf_options)
    target = out_dir / "model.onnx"
    if fix_for_ort:
        ort_friendly(written, target)
        written.unlink()
    else:
        written.rename(target)
    return target
