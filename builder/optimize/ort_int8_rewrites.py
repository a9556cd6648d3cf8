"""The parts of the fast INT8 recipe that ONNX Runtime's quantizer does not do itself.

- mean_quantile_ranges: activation ranges as NNCF's MEAN_QUANTILE estimator computes them (per image, the
  outlier_prob and 1 - outlier_prob quantiles of every float tensor; averaged over the images), handed to
  quantize_static as TensorQuantOverrides. ORT's min/max takes the extreme of all images, which on MobileNetV3
  leaves the small channels of a tensor with a few levels; its percentile pools |x| over all images.
- float_tail_inputs: the tensors the quantized body hands to the float decode tail (CenterNet's class logits) take
  the extremes of all images, not mean quantiles: their tails are the detections. With the mean 1 - 1e-4 quantile
  (about -1.9) the uint8 range ends at 0, and every detection above sigmoid(0) = 0.5 scored exactly 0.5.
- separate_resize_ranges: keeps an excluded bilinear Resize running in float. When its input and output share one
  scale, ORT's optimizer drops the DQ -> Resize -> Q around it and runs its slow uint8 NHWC Resize.
- fold_scalar_muls: DQ(x) * c -> Q -> DQ becomes DQ(x) with scale * c. MobileNetV3's hard-swish is
  (x * 1/6) * relu6(x + 3); the x * 1/6 is a QLinearMul over the whole activation tensor that a scale change does
  exactly, and one rounding less.
- pool_peaks_on_logits: CenterNet's peak test heat == MaxPool(heat), heat = Sigmoid(DQ(logits)), runs on the
  quantized logits as a uint8 MaxPool (same peaks: Sigmoid is increasing), without the float MaxPool's NCHW
  detour (a Transpose and two NCHWc reorders of the whole heatmap).

docs/INT8.md has the measurements behind each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from builder.optimize.ort_common import QuantizationError

DEFAULT_OUTLIER_PROB = 1e-4  # NNCF's quantile_outlier_prob


def _float_node_outputs(model) -> list[str]:
    """Names of the float tensors the nodes produce (types from ONNX shape inference), in graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    return [o for n in model.graph.node for o in n.output if o and types.get(o) == onnx.TensorProto.FLOAT]


def float_tail_inputs(model, excluded: Sequence[str]) -> list[str]:
    """Tensors a quantized node produces and a node kept in float (excluded) reads: the body -> float tail seam."""
    excluded = set(excluded)
    producer = {out: node.name for node in model.graph.node for out in node.output}
    return sorted({name for node in model.graph.node if node.name in excluded for name in node.input
                   if name in producer and producer[name] not in excluded})


def mean_quantile_ranges(model_path: Path, tensors: Sequence[np.ndarray], input_name: str,
                         outlier_prob: float = DEFAULT_OUTLIER_PROB,
                         extremes: Sequence[str] = ()) -> dict[str, tuple[float, float]]:
    """{tensor: (low, high)} for every float tensor a node of the model produces.

    Per image, low is the k-th smallest and high the k-th largest value of the tensor, k = floor(outlier_prob *
    (size - 1)); both are averaged over the images. The tensors named in `extremes` get the smallest and largest
    value over all images instead. ORT runs the model unoptimized on one thread, so the tensors are the graph's
    own and the result is the same on every run.
    """
    import onnx
    import onnxruntime as ort

    if not 0.0 <= outlier_prob < 0.5:
        raise ValueError(f"outlier_prob must be in [0, 0.5), got {outlier_prob!r}")
    model = onnx.load(str(model_path))
    names = _float_node_outputs(model)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    lows: dict[str, list[float]] = {n: [] for n in names}
    highs: dict[str, list[float]] = {n: [] for n in names}
    mins: dict[str, list[float]] = {n: [] for n in names}
    maxes: dict[str, list[float]] = {n: [] for n in names}
    for tensor in tensors:
        for name, value in zip(names, session.run(names, {input_name: np.ascontiguousarray(tensor, np.float32)})):
            flat = np.asarray(value, dtype=np.float32).ravel()
            if flat.size == 0:
                continue
            k = int(outlier_prob * (flat.size - 1))
            ends = np.partition(flat, (k, flat.size - 1 - k))
            lows[name].append(float(ends[k]))
            highs[name].append(float(ends[flat.size - 1 - k]))
            mins[name].append(float(ends[0]) if k == 0 else float(flat.min()))
            maxes[name].append(float(ends[-1]) if k == 0 else float(flat.max()))
    ranges = {n: (float(np.mean(lows[n])), float(np.mean(highs[n]))) for n in names if lows[n]}
    for name in set(extremes) & set(ranges):
        ranges[name] = (float(np.min(mins[name])), float(np.max(maxes[name])))
    return ranges


def uint8_params(low: float, high: float) -> tuple[np.float32, int]:
    """(scale, zero point) ORT's quantizer derives for asymmetric uint8 from a range given as float32 overrides."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    zero, scale = compute_scale_zp(np.float32(low), np.float32(high), np.array(0, np.uint8), np.array(255, np.uint8))
    return np.float32(scale), int(zero)


def separate_resize_ranges(ranges: dict[str, tuple[float, float]], model, resize_nodes: Sequence[str]) -> list[str]:
    """Widen by one quantization step the output range of each Resize in resize_nodes whose output would get the
    scale and zero point of its input; returns those nodes. In place on ranges."""
    widened = []
    wanted = set(resize_nodes)
    for node in model.graph.node:
        if node.name not in wanted or node.input[0] not in ranges or node.output[0] not in ranges:
            continue
        if uint8_params(*ranges[node.input[0]]) == uint8_params(*ranges[node.output[0]]):
            low, high = ranges[node.output[0]]
            ranges[node.output[0]] = (low, high + float(uint8_params(low, high)[0]))
            widened.append(node.name)
    return widened


def range_overrides(ranges: dict[str, tuple[float, float]]) -> dict[str, list[dict[str, np.float32]]]:
    """quantize_static's extra_options["TensorQuantOverrides"] for per-tensor activation ranges."""
    return {name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in sorted(ranges.items())}


def _scalar_value(name: str, initializers: dict, producers: dict) -> float | None:
    """The value of a one-element constant: an initializer, or DequantizeLinear of one (ORT quantizes Mul's
    constant operand)."""
    from onnx import numpy_helper

    if name in initializers:
        value = numpy_helper.to_array(initializers[name])
        return float(value.reshape(-1)[0]) if value.size == 1 else None
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
        return None
    data = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64) if len(node.input) > 2 else 0.0
    value = (data - zero) * scale
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _graph_maps(graph) -> tuple[dict, dict, dict[str, list], set[str]]:
    """(initializers by name, producing node by tensor, consuming nodes by tensor, graph output names)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return ({t.name: t for t in graph.initializer}, {o: n for n in graph.node for o in n.output}, consumers,
            {o.name for o in graph.output})


def fold_scalar_muls(model) -> list[str]:
    """In a QDQ model: every Mul of a per-tensor DequantizeLinear activation by a positive scalar constant, whose
    output only goes through one QuantizeLinear into DequantizeLinear nodes, is removed; those DequantizeLinear
    nodes read the Mul's input with the scale multiplied by the constant. In place; the folded Mul names.

    Exact up to rounding: it removes one requantization (and the clipping of the Mul's output range).
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers, producers, consumers, outputs = _graph_maps(graph)
    removed: set[int] = set()
    folded: list[str] = []
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        for side in (0, 1):
            constant = _scalar_value(node.input[1 - side], initializers, producers)
            dq = producers.get(node.input[side])
            if constant is None or not constant > 0 or dq is None or dq.op_type != "DequantizeLinear" \
                    or dq.input[0] in initializers or len(dq.input) < 3 or dq.input[1] not in initializers:
                continue
            scale = numpy_helper.to_array(initializers[dq.input[1]])
            after = consumers.get(node.output[0], [])
            if scale.size != 1 or len(after) != 1 or after[0].op_type != "QuantizeLinear" or after[0].output[0] in outputs:
                continue
            quantize = after[0]
            readers = consumers.get(quantize.output[0], [])
            if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
                continue
            name = f"{node.name or node.output[0]}/folded_scale"
            graph.initializer.append(numpy_helper.from_array((scale.astype(np.float64) * constant).astype(np.float32), name))
            for reader in readers:
                del reader.input[:]
                reader.input.extend([dq.input[0], name, dq.input[2]])
            removed.update((id(node), id(quantize)))
            folded.append(node.name or node.output[0])
            break
    _prune(graph, removed)
    return folded


def pool_peaks_on_logits(model) -> list[str]:
    """CenterNet's peak test `heat == MaxPool(heat)` with heat = Sigmoid(DequantizeLinear(q)), rewritten to run on
    the quantized logits: MaxPool(DQ(q)) -> Q -> DQ (ORT runs it as a uint8 NHWC MaxPool) and Equal on the logits.
    In place; the names of the MaxPools replaced.

    Sigmoid is strictly increasing and DequantizeLinear is increasing, so both sides pick the same maxima: the
    mask only differs where float32 Sigmoid rounds two different neighbouring logits to the same value (above
    ~16.6, where the original also marks the smaller one as a peak). It removes the float MaxPool's NCHW detour
    (a Transpose and two NCHWc reorders of the whole heatmap) from the INT8 graph. Each Equal operand may be the
    tensor itself or one Transpose of it; anything else is left alone.
    """
    from onnx import helper

    graph = model.graph
    initializers, producers, consumers, outputs = _graph_maps(graph)

    def source(name: str) -> tuple[str, list[int] | None]:
        node = producers.get(name)
        if node is not None and node.op_type == "Transpose":
            return node.input[0], [int(v) for a in node.attribute if a.name == "perm" for v in a.ints]
        return name, None

    replaced, added, removed, matched = [], [], set(), set()
    for pool in [n for n in graph.node if n.op_type == "MaxPool"]:
        sigmoid = producers.get(pool.input[0])
        dq = producers.get(sigmoid.input[0]) if sigmoid is not None and sigmoid.op_type == "Sigmoid" else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or dq.input[1] not in initializers \
                or len(pool.output) != 1 or pool.output[0] in outputs:
            continue
        pooled_readers = consumers.get(pool.output[0], [])
        equals = []
        for reader in pooled_readers:
            equal = reader
            if reader.op_type == "Transpose":  # read by the Equal alone: it goes with the MaxPool
                after = consumers.get(reader.output[0], [])
                equal = after[0] if len(after) == 1 and reader.output[0] not in outputs else None
            if equal is None or equal.op_type != "Equal":
                break
            sides = [source(i) for i in equal.input]
            if sorted(name for name, _ in sides) != sorted([sigmoid.output[0], pool.output[0]]) or sides[0][1] != sides[1][1]:
                break
            equals.append((equal, sides[0][1]))
        if not equals or len(equals) != len(pooled_readers):
            continue
        base = pool.name or pool.output[0]
        logits, pooled = dq.output[0], f"{base}/on_logits_dq"
        added += [
            helper.make_node("MaxPool", [logits], [f"{base}/on_logits"], f"{base}/on_logits",
                             **{a.name: helper.get_attribute_value(a) for a in pool.attribute}),
            helper.make_node("QuantizeLinear", [f"{base}/on_logits", dq.input[1], dq.input[2]], [f"{base}/on_logits_q"],
                             f"{base}/on_logits_q"),
            helper.make_node("DequantizeLinear", [f"{base}/on_logits_q", dq.input[1], dq.input[2]], [pooled],
                             f"{base}/on_logits_dq"),
        ]
        for k, (equal, perm) in enumerate(equals):
            operands = {}
            for tensor, name in ((logits, "logits"), (pooled, "pooled")):
                if perm is None:
                    operands[name] = tensor
                else:
                    operands[name] = f"{base}/{name}_t{k}"
                    added.append(helper.make_node("Transpose", [tensor], [operands[name]], operands[name], perm=perm))
            pooled_first = source(equal.input[0])[0] == pool.output[0]
            del equal.input[:]
            equal.input.extend([operands["pooled"], operands["logits"]] if pooled_first
                               else [operands["logits"], operands["pooled"]])
        removed.add(id(pool))
        matched.update(id(equal) for equal, _ in equals)
        replaced.append(pool.name or pool.output[0])
    if replaced:
        first_equal = min(i for i, n in enumerate(graph.node) if id(n) in matched)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes[:first_equal] + added + nodes[first_equal:])  # before their readers: topological
        _prune(graph, removed)
    return replaced


def _prune(graph, removed: set[int]) -> None:
    """Drop the removed nodes, then nodes and initializers nothing reads any more (graph outputs are kept)."""
    keep = [n for n in graph.node if id(n) not in removed]
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in keep for i in n.input} | outputs
        alive = [n for n in keep if any(o in read for o in n.output)]
        if len(alive) == len(keep):
            break
        keep = alive
    del graph.node[:]
    graph.node.extend(keep)
    read = {i for n in keep for i in n.input} | outputs
    initializers = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    produced = {o for n in keep for o in n.output}
    value_info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def resize_nodes(model) -> list[str]:
    """Names of the model's Resize nodes (the ones float_resize keeps in float); unnamed ones cannot be excluded."""
    nodes = [n for n in model.graph.node if n.op_type == "Resize"]
    if any(not n.name for n in nodes):
        raise QuantizationError("a Resize node has no name; float_resize needs named nodes to exclude them")
    return [n.name for n in nodes]
