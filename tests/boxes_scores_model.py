"""A tiny two-output detector in the `boxes_scores` format, made with onnx.helper, and the spec that serves it.

Input `images` float32 [batch, 64, 64, 3] (NHWC, pixels scaled to [0, 1] by the spec). Outputs `det_boxes`
[batch, 4, 4] (x1 y1 x2 y2, model-input pixels, the same for every image) and `det_scores` [batch, 4, 2] =
mean pixel value * SCORE_SLOPE + SCORE_BASE: only the dog's score depends on the image.

With the spec's thresholds (score 0.3, IoU 0.5): on a white image the cat (0.9) and the dog (0.2 + 0.6 = 0.8)
are kept, the second cat box overlaps the first (IoU 0.72) and is suppressed, the last is under the threshold;
on a black image only the cat is kept (dog 0.2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

SIZE = 64
CLASSES = ["cat", "dog"]
BOXES = np.array([[8, 8, 32, 32], [10, 10, 34, 34], [40, 16, 60, 48], [0, 40, 20, 60]], np.float32)
SCORE_BASE = np.array([[0.9, 0.1], [0.6, 0.05], [0.1, 0.2], [0.02, 0.01]], np.float32)
SCORE_SLOPE = np.array([[0, 0], [0, 0], [0, 0.6], [0, 0]], np.float32)
SCORE_THRESHOLD = 0.3


def write_model(path: Path) -> Path:
    constants = {"boxes_const": BOXES, "score_base": SCORE_BASE, "score_slope": SCORE_SLOPE,
                 "zero": np.zeros((), np.float32), "mean_shape": np.array([-1, 1, 1], np.int64)}
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "mean_shape"], ["mean"]),  # [B, 1, 1]
        helper.make_node("Mul", ["mean", "zero"], ["batch_zeros"]),
        helper.make_node("Add", ["batch_zeros", "boxes_const"], ["det_boxes"]),
        helper.make_node("Mul", ["mean", "score_slope"], ["sloped"]),
        helper.make_node("Add", ["sloped", "score_base"], ["det_scores"]),
    ]
    graph = helper.make_graph(
        nodes, "boxes_scores",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, ["batch", len(BOXES), 4]),
         helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, ["batch", len(BOXES), len(CLASSES)])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def spec_mapping(model: Path, name: str = "boxes") -> dict:
    return {
        "name": name,
        "model": {
            "path": str(model),
            "input": {"name": "images", "layout": "NHWC", "height": SIZE, "width": SIZE, "dtype": "float32",
                      "resize": "stretch", "scale": 1 / 255},
            "output": {"format": "boxes_scores", "names": {"boxes": "det_boxes", "scores": "det_scores"}},
        },
        "classes": CLASSES,
        "thresholds": {"score": SCORE_THRESHOLD, "iou": 0.5, "max_detections": 10},
        "target": "cpu",
    }


def write_spec(folder: Path, name: str = "boxes") -> Path:
    """The model and a spec naming it, in folder; the spec's path."""
    model = write_model(folder / "boxes_scores.onnx")
    path = folder / "boxes_scores.yaml"
    path.write_text(yaml.safe_dump(spec_mapping(model, name)))
    return path


def expected_detections(width: int, height: int, white: bool) -> list[tuple[str, list[float], float]]:
    """(class, box on original pixels, score) the pipeline answers for a flat white or black image (stretch)."""
    sx, sy = width / SIZE, height / SIZE
    cat = ("cat", [8 * sx, 8 * sy, 32 * sx, 32 * sy], 0.9)
    dog = ("dog", [40 * sx, 16 * sy, 60 * sx, 48 * sy], 0.8)
    return [cat, dog] if white else [cat]
