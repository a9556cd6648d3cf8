"""What an ONNX graph holds and what ONNX Runtime really executes: integer kernels, float convs, Q/DQ left, and
the decode tail of a detector (kept float by every reduced-precision builder).
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from builder.errors import BuilderError
from builder.optimize.ort_common import session_options

# Ops that stop the backward walk of default_head_exclusions: the last learned layers before the decode.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Integer kernels: what a QDQ graph becomes once ORT fuses DQ -> op -> Q, or what QOperator writes directly.
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool",
               "QLinearConcat", "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose")
LEVELS = ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def count_ops(graph, executed: bool = False) -> dict[str, Any]:
    """Q/DQ, integer-kernel and float-conv counts of one graph (main graph; this detector has no subgraphs).

    executed=False (a saved QDQ file): a Conv fed by DequantizeLinear on data and weights is a quantized Conv
    waiting for ORT's fusion, not a float conv. executed=True (ORT's optimized graph): whatever ORT did not fuse
    into an integer kernel runs in float, DequantizeLinear in front or not, so every Conv counts as float.
    """
    ops = Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    float_convs = 0
    for node in graph.node:
        if node.op_type not in FLOAT_CONV_OPS:
            continue
        fed = [producers.get(name) for name in node.input[:2]]
        if executed or not all(p is not None and p.op_type == "DequantizeLinear" for p in fed):
            float_convs += 1
    integer = {op: ops[op] for op in INTEGER_OPS if ops.get(op)}
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "integer_ops": integer,
        "integer_total": sum(integer.values()),
        "float_conv": float_convs,
        "nodes": sum(ops.values()),
    }


def executed_graph(path: Path, level: str = "ORT_ENABLE_ALL"):
    """The graph ONNX Runtime runs on this CPU: its optimized model at `level`, through a temporary file."""
    import onnx
    import onnxruntime as ort

    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    with tempfile.TemporaryDirectory(prefix="ort-opt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(getattr(ort.GraphOptimizationLevel, level), optimized_path=optimized),
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
    file_counts = count_ops(onnx.load(str(path), load_external_data=False).graph)
    executed = count_ops(executed_graph(path, level), executed=True)
    executed["level"] = level
    return {"file": file_counts, "executed": executed}


def float_resizes(graph) -> dict[str, int]:
    """Resize nodes of an executed graph by the element type they run on: float (fed by DequantizeLinear or a
    float op) or integer (ORT's uint8 Resize, left when the Q/DQ around a Resize share one scale)."""
    producers = {o: n for n in graph.node for o in n.output}
    float_run = integer_run = 0
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        producer = producers.get(node.input[0])
        if producer is not None and producer.op_type in ("QuantizeLinear", *INTEGER_OPS):
            integer_run += 1
        else:
            float_run += 1
    return {"float": float_run, "integer": integer_run}


def requantized_by_ort(graph, excluded: tuple[str, ...], source: Path) -> list[str]:
    """Excluded Conv/Gemm nodes that ORT nevertheless runs as integer kernels.

    ORT's WeightBiasQuantization transformer (BASIC level and up) gives a float-weight Conv whose input comes from
    DequantizeLinear per-tensor int8 weights, and the QDQ fusion then makes it a QLinearConv: excluding one Conv
    in the middle of a quantized region does not always keep it float (ORT 1.22: the bias-less separable
    depthwise convs of the fixture's head are re-quantized, convs with a bias stay float).
    """
    import onnx

    compute = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node
               if n.op_type in COMPUTE_OPS and n.name in set(excluded)}
    integer = [n.name for n in graph.node if n.op_type in INTEGER_OPS]
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
        if node is None or node.op_type in COMPUTE_OPS:
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
