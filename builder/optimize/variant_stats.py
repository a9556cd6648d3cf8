"""A model variant's size: files, parameters, weight bytes, and its quantized op counts."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from builder.optimize.variants import Variant


_SUBBYTE = {"INT4", "UINT4", "FLOAT4E2M1"}


def _tensor_nbytes(tensor: Any) -> tuple[int, int]:
    """(element count, bytes) of an ONNX TensorProto from its dims and type, so external data counts too."""
    from onnx import TensorProto, helper

    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    type_name = TensorProto.DataType.Name(tensor.data_type)
    if type_name == "STRING":
        return count, sum(len(s) for s in tensor.string_data)
    if type_name in _SUBBYTE:
        return count, (count + 1) // 2
    return count, count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _onnx_graph_tensors(graph: Any) -> Iterable[Any]:
    """Initializers and Constant-node tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _onnx_graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_graph_tensors(sub)


def _ir_const_stats(xml_path: Path) -> tuple[int | None, int | None]:
    """(parameter count, bytes) of the Const layers of an OpenVINO IR .xml, or (None, None) if unreadable."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError):
        return None, None
    params, nbytes = 0, 0
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        if data is None:
            continue
        shape = [int(d) for d in (data.get("shape") or "").split(",") if d.strip()]
        params += int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes += int(data.get("size") or 0)
    return params, nbytes


def file_stats(variant: Variant) -> dict[str, Any]:
    """file_bytes (all of the variant's files on disk), weight_bytes and parameters.

    ONNX: weight_bytes is the initializers' (and Constant nodes') storage from their types and shapes,
    so an int8 weight counts 1 byte; parameters counts their elements, quantization scales and zero points
    included. OpenVINO IR: weight_bytes is the .bin size; parameters the elements of the Const layers.
    TensorRT plans: weights are not separable, both are None.
    """
    files = {f.name: f.stat().st_size for f in variant.files()}
    stats: dict[str, Any] = {"file_bytes": sum(files.values()), "files": files, "weight_bytes": None, "parameters": None}
    if variant.runtime == "onnxruntime" or variant.path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(variant.path), load_external_data=False)
        params = nbytes = 0
        for tensor in _onnx_graph_tensors(model.graph):
            count, size = _tensor_nbytes(tensor)
            params += count
            nbytes += size
        stats.update(weight_bytes=nbytes, parameters=params)
    elif variant.path.suffix == ".xml":
        params, _ = _ir_const_stats(variant.path)
        stats.update(weight_bytes=files.get(variant.path.with_suffix(".bin").name), parameters=params)
    return stats


QUANT_ONNX_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")


def quantized_op_counts(variant: Variant) -> dict[str, int]:
    """Counts of quantization-related ops: ONNX Q/DQ, QLinear*, *Integer; OpenVINO FakeQuantize/FakeConvert."""
    from collections import Counter

    counts: Counter[str] = Counter()
    if variant.path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(variant.path), load_external_data=False)
        for node in model.graph.node:
            if node.op_type in QUANT_ONNX_OPS or node.op_type.startswith("QLinear"):
                counts[node.op_type] += 1
    elif variant.path.suffix == ".xml":
        try:
            root = ET.parse(variant.path).getroot()
        except (ET.ParseError, OSError):
            return {}
        for layer in root.iter("layer"):
            if layer.get("type") in ("FakeQuantize", "FakeConvert"):
                counts[str(layer.get("type"))] += 1
    return dict(sorted(counts.items()))
