"""A stand-in for the fixture detector with its interface and trivial compute, for the sidecar's mechanics tests.

Same input (`tower_0/images:0`, float32 [1, 512, 512, 3] NHWC, raw 0..255) and served output (`tower_0/detections`,
[1, 100, 6] x1 y1 x2 y2 score class, `detections` format) as centernet_mb3_coco.onnx, so the fixture spec serves it
with only model.path changed (spec()). It answers the same three boxes for every image: a dog, a bicycle and a
car, roughly where the fixture detector finds them in dog.jpg, above the spec's score threshold; the other rows
score 0. Swaps, rollbacks, crash recovery, deltas and restarts do not depend on what the detector computes, and
this one costs a reduction over the input instead of a CNN.

The graph carries weights like a real model: one large tensor and, last, four small ones (what
test_sidecar_swap's "retrained" variant rescales, so a delta bundle is a small fraction of a full one). They are
multiplied by zero into the output, so rescaling them changes the bytes and not the detections.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.spec import PipelineSpec, load_spec
from tests.conftest import SPEC

INPUT = "tower_0/images:0"
OUTPUT = "tower_0/detections"
ROWS = 100
# model-input pixels (512 x 512 stretched), score, COCO class id (coco80.names: 1 bicycle, 2 car, 16 dog)
DETECTIONS = np.array([[60, 190, 230, 480, 0.9, 16], [100, 110, 400, 380, 0.8, 1], [320, 60, 480, 150, 0.7, 2]],
                      np.float32)
LARGE_WEIGHTS = 1 << 20  # floats: a 4 MiB model, most of it incompressible
SMALL_WEIGHTS = 4, 1024


def write_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    table = np.zeros((1, ROWS, 6), np.float32)
    table[0, :len(DETECTIONS)] = DETECTIONS
    weights = [rng.standard_normal(LARGE_WEIGHTS).astype(np.float32)]
    weights += [rng.standard_normal(SMALL_WEIGHTS[1]).astype(np.float32) for _ in range(SMALL_WEIGHTS[0])]
    names = [f"weights_{n}" for n in range(len(weights))]
    nodes = [helper.make_node("ReduceMean", [INPUT], ["pixel_mean"], axes=[1, 2, 3], keepdims=1)]  # [1, 1, 1, 1]
    nodes += [helper.make_node("ReduceSum", [name], [f"{name}_sum"], keepdims=0) for name in names]
    nodes.append(helper.make_node("Sum", ["pixel_mean", *[f"{name}_sum" for name in names]], ["everything"]))
    nodes.append(helper.make_node("Mul", ["everything", "zero"], ["nothing"]))
    nodes.append(helper.make_node("Reshape", ["nothing", "scalar_shape"], ["nothing_scalar"]))
    nodes.append(helper.make_node("Add", ["table", "nothing_scalar"], [OUTPUT]))
    initializers = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.zeros((), np.float32), "zero"),
                    numpy_helper.from_array(np.array([], np.int64), "scalar_shape")]
    initializers += [numpy_helper.from_array(w, name) for w, name in zip(weights, names)]  # the small ones last
    graph = helper.make_graph(nodes, "synthetic_detector",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 512, 512, 3])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, ROWS, 6])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def spec(folder: Path) -> PipelineSpec:
    """The fixture spec (specs/centernet_coco.yaml) serving the synthetic detector written into folder."""
    return load_spec(SPEC).replace(model_path=write_model(Path(folder) / "synthetic_detector.onnx"))
