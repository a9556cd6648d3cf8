"""builder.compress.torch_copy: the trainable PyTorch copy of the fixture detector, proved equal to ONNX Runtime.

The asymmetric Resize converter is checked op by op against ONNX Runtime's Resize (several sizes and scales), then
the whole copy against ONNX Runtime on fixture photos: the max abs difference is printed and must be within
float rounding; onnx2torch's own Resize (half_pixel) is the negative control that must fail the same check.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from builder.compress import CompressError, set_torch_threads
from builder.compress import torch_copy as tc
from builder.optimize.evaluate import prepare_image
from builder.spec import load_spec
from tests.conftest import IMAGES, MODEL, ROOT, SPEC

set_torch_threads(1)


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> tc.TrainableCopy:
    return tc.to_torch(MODEL, tmp_path_factory.mktemp("torch_copy"), threads=1)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Two fixture photos as the server's preprocess makes them (NHWC, raw 0..255)."""
    spec = load_spec(SPEC)
    return np.stack([prepare_image(spec, IMAGES / name)[0] for name in ("dog.jpg", "horses.jpg")])


def ort_resize(x: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    graph = helper.make_graph(
        [node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("roi", TensorProto.FLOAT, [0], []),
         helper.make_tensor("scales", TensorProto.FLOAT, [4], list(scales))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("shape,scales", [((1, 3, 16, 16), (1, 1, 2, 2)), ((2, 5, 7, 9), (1, 1, 2, 2)),
                                          ((1, 2, 6, 10), (1, 1, 1.5, 3)), ((1, 1, 5, 4), (1, 1, 0.5, 2.5))])
def test_asymmetric_resize_matches_onnx_runtime(shape, scales):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 50
    expected = ort_resize(x, scales)
    got = tc.AsymmetricLinearResize(scales)(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-6)


def test_asymmetric_resize_is_differentiable():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    tc.AsymmetricLinearResize((1, 1, 2, 2))(x).sum().backward()
    # every input pixel contributes to the upsampled output: no gradient is zero
    assert x.grad is not None and torch.all(x.grad > 0)


def test_asymmetric_resize_refuses_channel_scales():
    with pytest.raises(CompressError, match="H and W"):
        tc.AsymmetricLinearResize((1, 2, 2, 2))


def test_head_cut_of_the_fixture():
    cut = tc.find_head_cut(MODEL)
    assert cut.input_name == "tower_0/images:0" and cut.input_perm == (0, 3, 1, 2)
    assert cut.head_shapes["heatmap_logits"] == (1, 80, 128, 128)  # 80 COCO classes, before the Sigmoid
    assert cut.head_shapes["wh"] == (1, 4, 128, 128)
    assert cut.served_outputs == tuple(o.name for o in onnx.load(str(MODEL)).graph.output)
    graph = onnx.load(str(MODEL)).graph
    sigmoid_inputs = {n.input[0] for n in graph.node if n.op_type == "Sigmoid"}
    assert cut.heads["heatmap_logits"] in sigmoid_inputs


def test_copy_rewrites_are_recorded(copy):
    assert len(copy.rewrites["asymmetric_resizes"]) == 3
    assert len(copy.rewrites["identity_reshapes_removed"]) == 18
    assert sum(isinstance(m, tc.AsymmetricLinearResize) for m in copy.module.modules()) == 3


def test_copy_equals_onnx_runtime(copy, photos):
    report = tc.check_equality(copy, photos)
    print(f"\ntorch copy vs ONNX Runtime on {report.images} photos: max abs diff {report.max_abs_diff} "
          f"(reference max {report.reference_max_abs}), correlation {report.correlation}")
    assert report.passed
    assert report.max_abs_diff["heatmap_logits"] < 1e-3
    assert all(c > 0.999999 for c in report.correlation.values())


def test_onnx2torch_resize_is_not_equal(tmp_path, photos):
    """The negative control: onnx2torch's own Resize (half_pixel) fails the same check."""
    theirs = tc.to_torch(MODEL, tmp_path, own_resize=False)
    report = tc.check_equality(theirs, photos[:1])
    print(f"\nonnx2torch's Resize: max abs diff {report.max_abs_diff}, correlation {report.correlation}")
    assert not report.passed
    assert report.correlation["heatmap_logits"] < 0.99


def test_copy_trains(copy, photos):
    """forward + backward through the copy: every parameter gets a gradient."""
    import copy as copy_module

    module = copy_module.deepcopy(copy.module).train()
    logits, wh = module(torch.from_numpy(tc.nhwc_to_input(photos[:1])))
    (logits.mean() + wh.mean()).backward()
    params = list(module.parameters())
    assert params and all(p.grad is not None for p in params)


def test_batch_of_two_equals_two_batches_of_one(copy, photos):
    x = torch.from_numpy(tc.nhwc_to_input(photos))
    with torch.no_grad():
        both = copy.module(x)
        first = copy.module(x[:1])
    np.testing.assert_allclose(both[0][:1].numpy(), first[0].numpy(), atol=1e-4)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        tc.find_head_cut(tmp_path / "missing.onnx")
    with pytest.raises(CompressError, match=r"\[N, H, W, C\]"):
        tc.nhwc_to_input(np.zeros((512, 512, 3)))
    # a model without the CenterNet head layout
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 3, 1, 2])], "g", [x], [y])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CompressError, match="heatmap_logits"):
        tc.find_head_cut(path)
    with pytest.raises(CompressError, match="positive integer"):
        set_torch_threads(0)


STANDIN_CHECK = """
import importlib.abc, sys
class NoTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("torchvision is not installed (simulated)")
sys.meta_path.insert(0, NoTorchvision())
from builder.compress import CompressError
from builder.compress.torch_copy import import_onnx2torch
import_onnx2torch()
tv = sys.modules["torchvision"]
assert tv.__edgestack_standin__
try:
    tv.ops.nms(None, None, 0.5)
except CompressError as exc:
    print("refused:", exc)
"""


def test_onnx2torch_imports_without_torchvision():
    """A fresh machine has no torchvision (make setup installs onnx2torch --no-deps): the stand-in makes the import
    work and its ops refuse with a clear error."""
    result = subprocess.run([sys.executable, "-c", STANDIN_CHECK], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: torchvision.ops.nms is not installed" in result.stdout

