"""builder.optimize.ort_int8_rewrites and ort_graph.count_ops on small hand-made graphs with known answers.

The fixture detector's use of them (28 folded Muls, 3 float Resizes, fidelity) is in test_ort_variants.py and
tests/integration/test_int8_served.py.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.optimize import ort_int8_rewrites as rw
from builder.optimize.ort_common import QuantizationError
from builder.optimize.ort_graph import count_ops

X_SCALE, X_ZERO = 0.1, 128  # input activation: uint8, range [-12.8, 12.7]


def const(name: str, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def qdq_mul_model(constant: float, constant_quantized: bool = True, mul_is_output: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Mul(c) -> Q -> DQ -> Relu -> y, the shape ORT's QDQ quantizer writes for x * c."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"], name="dq_x"),
    ]
    inits = [const("xs", X_SCALE), const("xz", X_ZERO, np.uint8), const("ms", 0.3), const("mz", 100, np.uint8)]
    if constant_quantized:  # ORT quantizes Mul's constant operand: uint8 255 with scale c / 255
        inits += [const("cq", 255, np.uint8), const("cs", constant / 255), const("cz", 0, np.uint8)]
        nodes.append(helper.make_node("DequantizeLinear", ["cq", "cs", "cz"], ["c"], name="dq_c"))
    else:
        inits.append(const("c", constant))
    nodes += [
        helper.make_node("Mul", ["xf", "c"], ["m"], name="mul"),
        helper.make_node("QuantizeLinear", ["m", "ms", "mz"], ["mq"], name="q_m"),
        helper.make_node("DequantizeLinear", ["mq", "ms", "mz"], ["mf"], name="dq_m"),
        helper.make_node("Relu", ["mf"], ["y"], name="relu"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])]
    if mul_is_output:
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


X = np.array([[-3.0, -0.55, 0.0, 0.1, 0.44, 1.0, 2.5, 7.0]], np.float32)


@pytest.mark.parametrize("constant_quantized", [True, False])
def test_fold_scalar_mul_becomes_a_scale_change(constant_quantized):
    model = qdq_mul_model(1 / 6, constant_quantized)
    folded = rw.fold_scalar_muls(model)
    assert folded == ["mul"]
    onnx.checker.check_model(model)
    assert [n.name for n in model.graph.node] == ["q_x", "dq_m", "relu"]  # Mul, its Q, and now-unread nodes gone
    reader = model.graph.node[1]
    assert list(reader.input)[0] == "xq" and list(reader.input)[2] == "xz"
    scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == reader.input[1]))
    assert scale == pytest.approx(X_SCALE / 6, rel=1e-6)
    # exactly the quantized x times 1/6 (one rounding less than before: no requantization to the Mul's scale)
    quantized_x = (np.clip(np.round(X / X_SCALE) + X_ZERO, 0, 255) - X_ZERO) * X_SCALE
    np.testing.assert_allclose(run(model, X), np.maximum(quantized_x / 6, 0), rtol=1e-6, atol=1e-7)


def test_fold_changes_the_answer_by_at_most_the_removed_rounding():
    before = run(qdq_mul_model(1 / 6), X)
    model = qdq_mul_model(1 / 6)
    rw.fold_scalar_muls(model)
    np.testing.assert_allclose(run(model, X), before, atol=0.3 / 2 + 1e-6)  # half a step of the Mul's scale 0.3


@pytest.mark.parametrize("model", [
    qdq_mul_model(-0.5),                     # a negative scale is not a scale
    qdq_mul_model(0.0),
    qdq_mul_model(1 / 6, mul_is_output=True),  # the Mul's float output is read directly
], ids=["negative", "zero", "graph-output"])
def test_fold_leaves_what_it_cannot_fold(model):
    before = model.SerializeToString()
    assert rw.fold_scalar_muls(model) == []
    assert model.SerializeToString() == before


def test_mean_quantile_ranges_average_per_image_quantiles(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["x"], ["n"], name="neg")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1001])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1001]),
         helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 1001])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    first = (np.arange(1001, dtype=np.float32) - 500)[None]
    ranges = rw.mean_quantile_ranges(path, [first, 2 * first], "x", outlier_prob=1e-3)
    # k = floor(1e-3 * 1000) = 1: the second smallest and second largest value of each image, averaged
    assert ranges == {"r": (0.0, (499 + 998) / 2), "n": (-(499 + 998) / 2, (499 + 998) / 2)}
    assert rw.mean_quantile_ranges(path, [first], "x", outlier_prob=0.0)["n"] == (-500.0, 500.0)  # min / max
    with pytest.raises(ValueError, match="outlier_prob"):
        rw.mean_quantile_ranges(path, [first], "x", outlier_prob=0.5)


def test_uint8_params_like_ort():
    assert rw.uint8_params(-1.0, 1.0) == (np.float32(2 / 255), 128)  # ORT: round(127.5) with a float64 scale
    assert rw.uint8_params(0.5, 6.0) == (np.float32(6 / 255), 0)  # zero always representable
    assert rw.uint8_params(0.0, 0.0) == (np.float32(1.0), 0)


def resize_model(name: str = "up") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Resize", ["a", "", "scales"], ["b"], name=name, mode="linear")],
        "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1, 4, 4])], [const("scales", [1, 1, 2, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_resize_output_range_is_widened_only_when_it_would_share_the_input_scale():
    ranges = {"a": (-1.0, 1.0), "b": (-1.0, 1.0)}
    assert rw.separate_resize_ranges(ranges, resize_model(), ["up"]) == ["up"]
    assert ranges["b"] == (-1.0, pytest.approx(1.0 + 2 / 255))
    assert rw.uint8_params(*ranges["b"]) != rw.uint8_params(*ranges["a"])
    different = {"a": (-1.0, 1.0), "b": (-0.9, 0.95)}
    assert rw.separate_resize_ranges(different, resize_model(), ["up"]) == []
    assert different["b"] == (-0.9, 0.95)


def test_resize_nodes_must_be_named():
    assert rw.resize_nodes(resize_model()) == ["up"]
    with pytest.raises(QuantizationError, match="no name"):
        rw.resize_nodes(resize_model(name=""))


def test_range_overrides_are_what_quantize_static_takes():
    overrides = rw.range_overrides({"b": (0.0, 2.0), "a": (-1.0, 1.0)})
    assert list(overrides) == ["a", "b"]
    assert overrides["a"] == [{"rmin": np.float32(-1.0), "rmax": np.float32(1.0)}]
    assert isinstance(overrides["a"][0]["rmin"], np.float32)


def test_count_ops_counts_dq_fed_convs_as_float_only_where_ort_has_run():
    """In a QDQ file DQ -> Conv waits for fusion; in ORT's executed graph a Conv left is a float conv."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
         helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g", [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [const("wq", np.ones((1, 1, 1, 1)), np.uint8), const("s", 0.1), const("z", 0, np.uint8)])
    assert count_ops(graph)["float_conv"] == 0
    assert count_ops(graph, executed=True)["float_conv"] == 1


def peak_model(transposed: bool = True) -> onnx.ModelProto:
    """CenterNet's tail as the quantizer leaves it: logits -> Q -> DQ -> Sigmoid -> heat; MaxPool 3x3 of heat;
    peaks = heat * (heat == pooled), optionally through NCHW -> NHWC Transposes as tf2onnx writes them."""
    perm = [0, 2, 3, 1]
    heat, pooled = ("heat_nhwc", "pooled_nhwc") if transposed else ("heat", "pooled")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"], name="dq_x"),
        helper.make_node("Sigmoid", ["xf"], ["heat"], name="sigmoid"),
        helper.make_node("MaxPool", ["heat"], ["pooled"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[1, 1]),
    ]
    if transposed:
        nodes += [helper.make_node("Transpose", ["heat"], ["heat_nhwc"], name="t_heat", perm=perm),
                  helper.make_node("Transpose", ["pooled"], ["pooled_nhwc"], name="t_pooled", perm=perm)]
    nodes += [
        helper.make_node("Equal", [heat, pooled], ["is_peak"], name="equal"),
        helper.make_node("Cast", ["is_peak"], ["mask"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [heat, "mask"], ["y"], name="peaks"),
    ]
    shape = [1, 6, 6, 3] if transposed else [1, 3, 6, 6]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
                               helper.make_tensor_value_info(heat, TensorProto.FLOAT, shape)],
                              [const("xs", X_SCALE), const("xz", X_ZERO, np.uint8)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("transposed", [True, False])
def test_peak_test_on_logits_gives_the_same_peaks(transposed):
    logits = np.random.default_rng(3).uniform(-8, 8, (1, 3, 6, 6)).astype(np.float32)
    logits[0, 0, 2, 2] = logits[0, 0, 2, 3] = 5.0  # a tie: both are peaks before and after
    model = peak_model(transposed)
    before = run(model, logits)
    assert rw.pool_peaks_on_logits(model) == ["pool"]
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MaxPool") == 1 and ops.count("Sigmoid") == 1
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert pool.input[0] == "xf", "the MaxPool reads the dequantized logits"
    after = run(model, logits)
    assert np.array_equal(before, after)
    assert 0 < np.count_nonzero(after) < after.size


def test_peak_rewrite_leaves_other_maxpools_alone():
    model = peak_model()
    equal = next(n for n in model.graph.node if n.op_type == "Equal")
    equal.input[0] = "pooled_nhwc"  # pooled == pooled: not the peak test
    equal.input[1] = "pooled_nhwc"
    assert rw.pool_peaks_on_logits(model) == []
    assert [n.name for n in model.graph.node if n.op_type == "MaxPool"] == ["pool"]


def test_peak_rewrite_keeps_a_pooled_heatmap_that_is_read_elsewhere():
    model = peak_model()
    model.graph.output.append(helper.make_tensor_value_info("pooled_nhwc", TensorProto.FLOAT, [1, 6, 6, 3]))
    assert rw.pool_peaks_on_logits(model) == []
    assert [n.name for n in model.graph.node if n.op_type == "MaxPool"] == ["pool"]
