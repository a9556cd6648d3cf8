"""builder.input_fusion: the fused graph on uint8 pixels equals the source graph on converted floats."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from backends.preprocess.image_ops import InputSpec, prepare_input
from builder.errors import BuilderError
from builder.input_fusion import fuse_input_conversion, transport_spec


def identity_plus_one(path, shape, elem=TensorProto.FLOAT):
    """A graph y = x + 1 whose input is `x` (float)."""
    one = helper.make_tensor("one", elem, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem, shape)], [helper.make_tensor_value_info("y", elem, shape)], [one],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("scale,mean,std", [(1.0, (0, 0, 0), (1, 1, 1)), (1 / 255, (0, 0, 0), (1, 1, 1)),
                                            (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_fused_graph_matches_float_preprocessing(tmp_path, layout, scale, mean, std):
    shape = [1, 8, 6, 3] if layout == "NHWC" else [1, 3, 8, 6]
    identity_plus_one(tmp_path / "m.onnx", shape)
    spec = InputSpec(height=8, width=6, layout=layout, scale=scale, mean=mean, std=std)
    fuse_input_conversion(tmp_path / "m.onnx", tmp_path / "fused.onnx", "x", spec)

    image = np.random.default_rng(0).integers(0, 256, (20, 15, 3), dtype=np.uint8)
    as_float, _ = prepare_input(image, spec)
    as_uint8, _ = prepare_input(image, transport_spec(spec))
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == as_float.shape
    np.testing.assert_allclose(run(tmp_path / "fused.onnx", as_uint8[None]), run(tmp_path / "m.onnx", as_float[None]),
                               rtol=1e-5, atol=1e-5)


def test_only_needed_nodes_are_added(tmp_path):
    identity_plus_one(tmp_path / "m.onnx", [1, 4, 4, 3])
    fuse_input_conversion(tmp_path / "m.onnx", tmp_path / "fused.onnx", "x", InputSpec(height=4, width=4))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert ops == ["Cast", "Add"]


def test_unknown_input_is_refused(tmp_path):
    identity_plus_one(tmp_path / "m.onnx", [1, 4, 4, 3])
    with pytest.raises(BuilderError, match="no input 'images'"):
        fuse_input_conversion(tmp_path / "m.onnx", tmp_path / "fused.onnx", "images", InputSpec(height=4, width=4))
    assert not (tmp_path / "fused.onnx").exists()
