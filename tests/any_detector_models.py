"""Tiny detectors in each registered layout, made with onnx.helper, and the specs that serve them.

Every model sees the same scene: four candidates in model-input pixels (DETECTIONS: a cat, a second cat box that
NMS suppresses, a dog whose score grows with the image's brightness, a weak bird) and encodes them the way its
layout does (TF's normalised y1 x1 y2 x2 with ids from 1, YOLOv5's cx cy w h + objectness, RT-DETR's logits and
normalised boxes, YOLOX's grid offsets, torchvision's labels from 1). Each output is base + slope x m, with m the
image's mean brightness in [0, 1], so one graph answers a white and a black image differently:
on white the pipeline keeps the cat (0.9) and the dog (0.8), on black only the cat (the dog is at 0.2).

The input is non-square (HEIGHT x WIDTH) so that a swapped x / y shows. Model outputs have symbolic dimensions,
as exported detectors do: only a trial run can tell whether a spec's format fits them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

HEIGHT, WIDTH = 48, 64
CLASSES = ["cat", "dog", "bird"]
SCORE_THRESHOLD = 0.3

# x1 y1 x2 y2 in model-input pixels, class index, score on black (m = 0), score gain on white (m = 1)
DETECTIONS = (
    ((8.0, 6.0, 30.0, 26.0), 0, 0.9, 0.0),
    ((9.0, 7.0, 31.0, 27.0), 0, 0.7, 0.0),   # IoU 0.84 with the first cat: suppressed
    ((36.0, 16.0, 60.0, 40.0), 1, 0.2, 0.6),
    ((2.0, 30.0, 12.0, 40.0), 2, 0.1, 0.0),
)


@dataclass(frozen=True)
class Output:
    """One output tensor: base + slope x m per image ([B, *base.shape]), stored as dtype."""

    name: str
    base: np.ndarray
    slope: np.ndarray | None = None
    dtype: int = TensorProto.FLOAT


def _xyxy() -> np.ndarray:
    return np.array([d[0] for d in DETECTIONS], np.float32)


def _scores(m: float) -> np.ndarray:
    return np.array([d[2] + d[3] * m for d in DETECTIONS], np.float32)


def _cxcywh(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                     boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def tf_od_api_outputs() -> list[Output]:
    """num_detections [B] = 4 of 6 rows (the last two are padding a decoder must ignore, one with a high score),
    detection_boxes normalised y1 x1 y2 x2, detection_classes float ids from 1."""
    boxes = _xyxy()[:, [1, 0, 3, 2]] / np.array([HEIGHT, WIDTH, HEIGHT, WIDTH], np.float32)
    boxes = np.concatenate([boxes, [[0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]]]).astype(np.float32)
    scores, gains = _scores(0), _scores(1) - _scores(0)
    return [
        Output("num_detections", np.array(len(DETECTIONS), np.float32)),
        Output("detection_boxes", boxes),
        Output("detection_scores", np.concatenate([scores, [0.99, 0.0]]).astype(np.float32),
               np.concatenate([gains, [0.0, 0.0]]).astype(np.float32)),
        Output("detection_classes", np.array([d[1] + 1 for d in DETECTIONS] + [3, 0], np.float32)),
    ]


def yolov5_outputs() -> list[Output]:
    """[B, N, 5 + C]: cx cy w h in pixels, objectness = the score, one-hot class scores."""
    base = np.zeros((len(DETECTIONS), 5 + len(CLASSES)), np.float32)
    slope = np.zeros_like(base)
    base[:, :4] = _cxcywh(_xyxy())
    base[:, 4], slope[:, 4] = _scores(0), _scores(1) - _scores(0)
    base[np.arange(len(DETECTIONS)), 5 + np.array([d[1] for d in DETECTIONS])] = 1.0
    return [Output("output0", base, slope)]


def rtdetr_outputs() -> list[Output]:
    """logits [B, Q, C] (sigmoid(logit) = the score at the class, -8 elsewhere) + normalised cx cy w h boxes."""
    logits = np.full((len(DETECTIONS), len(CLASSES)), -8.0, np.float32)
    slope = np.zeros_like(logits)
    for q, (_, cls, score, gain) in enumerate(DETECTIONS):
        logits[q, cls] = _logit(score)
        slope[q, cls] = _logit(score + gain) - _logit(score)
    boxes = _cxcywh(_xyxy()) / np.array([WIDTH, HEIGHT, WIDTH, HEIGHT], np.float32)
    return [Output("pred_logits", logits, slope), Output("pred_boxes", boxes.astype(np.float32))]


def yolox_outputs(strides: tuple[int, ...] = (8, 16, 32)) -> list[Output]:
    """[B, N, 5 + C] over every grid cell of every stride; each detection sits in the cell of the first stride
    (the second cat: the second stride) holding its centre as (offset within the cell, log size in cells); the
    other cells have objectness 0."""
    counts = [(HEIGHT // s) * (WIDTH // s) for s in strides]
    base = np.zeros((sum(counts), 5 + len(CLASSES)), np.float32)
    slope = np.zeros_like(base)
    for index, ((box, cls, score, gain), (cx, cy, w, h)) in enumerate(zip(DETECTIONS, _cxcywh(_xyxy()))):
        level = 1 if index == 1 else 0
        stride = strides[level]
        gx, gy = int(cx // stride), int(cy // stride)
        row = sum(counts[:level]) + gy * (WIDTH // stride) + gx
        assert not base[row].any(), "two detections in one cell"
        base[row, :4] = [cx / stride - gx, cy / stride - gy, math.log(w / stride), math.log(h / stride)]
        base[row, 4], slope[row, 4] = score, gain
        base[row, 5 + cls] = 1.0
    return [Output("output", base, slope)]


def torchvision_outputs() -> list[Output]:
    """boxes [B, N, 4] x1 y1 x2 y2 pixels, labels [B, N] int64 from 1, scores [B, N]."""
    return [
        Output("boxes", _xyxy()),
        Output("labels", np.array([d[1] + 1 for d in DETECTIONS], np.float32), dtype=TensorProto.INT64),
        Output("scores", _scores(0), _scores(1) - _scores(0)),
    ]


def write_model(path: Path, outputs: list[Output], *, layout: str = "NCHW", dtype: str = "float32",
                dynamic_size: bool = False) -> Path:
    """A graph from input `images` (uint8 or float32 scaled to [0, 1] by the spec) to the outputs."""
    spatial = ["height", "width"] if dynamic_size else [HEIGHT, WIDTH]
    dims = ["batch", 3, *spatial] if layout == "NCHW" else ["batch", *spatial, 3]
    elem = TensorProto.UINT8 if dtype == "uint8" else TensorProto.FLOAT
    unit = np.array(1 / 255 if dtype == "uint8" else 1.0, np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels"], ["mean4"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("Mul", ["mean4", "unit"], ["m"]),
    ]
    constants = {"unit": unit}
    graph_outputs = []
    for out in outputs:
        rank = out.base.ndim
        shape_name = f"{out.name}_mshape"
        constants[shape_name] = np.array([-1] + [1] * rank, np.int64)
        constants[f"{out.name}_base"] = out.base.astype(np.float32)
        constants[f"{out.name}_slope"] = (np.zeros_like(out.base) if out.slope is None else out.slope).astype(np.float32)
        nodes += [
            helper.make_node("Reshape", ["m", shape_name], [f"{out.name}_m"]),
            helper.make_node("Mul", [f"{out.name}_m", f"{out.name}_slope"], [f"{out.name}_gain"]),
            helper.make_node("Add", [f"{out.name}_gain", f"{out.name}_base"],
                             [out.name if out.dtype == TensorProto.FLOAT else f"{out.name}_f"]),
        ]
        if out.dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [f"{out.name}_f"], [out.name], to=out.dtype))
        symbolic = ["batch"] + [f"{out.name}_d{i}" for i in range(rank)]
        graph_outputs.append(helper.make_tensor_value_info(out.name, out.dtype, symbolic))
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("images", elem, dims)], graph_outputs,
                              [numpy_helper.from_array(value, name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@dataclass(frozen=True)
class Layout:
    """One detector layout: its outputs, its input, and the spec's model.output for it."""

    format: str
    outputs: Callable[[], list[Output]]
    output: dict
    layout: str = "NCHW"
    dtype: str = "float32"
    dynamic_size: bool = False


LAYOUTS = {
    "tf_od_api": Layout("tf_od_api", tf_od_api_outputs, {"format": "tf_od_api", "names": {
        "num_detections": "num_detections", "boxes": "detection_boxes", "scores": "detection_scores",
        "classes": "detection_classes"}}, layout="NHWC", dtype="uint8", dynamic_size=True),
    "yolov5": Layout("yolov5", yolov5_outputs, {"format": "yolov5", "name": "output0"}),
    "rtdetr": Layout("rtdetr", rtdetr_outputs, {"format": "rtdetr", "names": {"logits": "pred_logits",
                                                                              "boxes": "pred_boxes"}}),
    "yolox": Layout("yolox", yolox_outputs, {"format": "yolox", "name": "output"}),
    "torchvision": Layout("torchvision", torchvision_outputs, {"format": "torchvision", "names": {
        "boxes": "boxes", "labels": "labels", "scores": "scores"}}),
}


def spec_mapping(model: Path, layout: Layout, name: str, output: dict | None = None) -> dict:
    uint8 = layout.dtype == "uint8"
    return {
        "name": name,
        "model": {
            "path": str(model),
            "input": {"name": "images", "layout": layout.layout, "height": HEIGHT, "width": WIDTH,
                      "dtype": layout.dtype, "resize": "stretch", **({} if uint8 else {"scale": 1 / 255})},
            "output": output or layout.output,
        },
        "classes": CLASSES,
        "thresholds": {"score": SCORE_THRESHOLD, "iou": 0.5, "max_detections": 10},
        "runtime": {"max_batch_size": 4, "detector_instances": 1, "intra_op_threads": 1},
        "target": "cpu",
    }


def write_spec(folder: Path, fmt: str, name: str | None = None, output: dict | None = None) -> Path:
    """The layout's model and a spec serving it as pipeline `name` (default: the format), in folder."""
    layout = LAYOUTS[fmt]
    model = write_model(folder / f"{fmt}.onnx", layout.outputs(), layout=layout.layout, dtype=layout.dtype,
                        dynamic_size=layout.dynamic_size)
    path = folder / f"{name or fmt}.yaml"
    path.write_text(yaml.safe_dump(spec_mapping(model, layout, name or fmt, output)))
    return path


def expected_detections(width: int, height: int, white: bool) -> list[tuple[str, list[float], float]]:
    """(class, box on the original image's pixels, score), best first, for a flat white or black image of
    width x height stretched into the model input."""
    sx, sy = width / WIDTH, height / HEIGHT
    found = []
    for (x1, y1, x2, y2), cls, score, gain in (DETECTIONS[0], DETECTIONS[2]):
        score = score + gain * (1.0 if white else 0.0)
        if score > SCORE_THRESHOLD:
            found.append((CLASSES[cls], [x1 * sx, y1 * sy, x2 * sx, y2 * sy], score))
    return sorted(found, key=lambda d: -d[2])


def detect_in_process(spec_path: Path, white: bool, width: int = 128, height: int = 96
                      ) -> list[tuple[str, list[float], float]]:
    """The served pipeline's steps in process (preprocess, the graph in ONNX Runtime, postprocess with the spec's
    settings) on a flat white or black image: (class, box on original pixels, score), best first."""
    import onnxruntime as ort

    from backends.postprocess.pipeline import postprocess_image
    from backends.preprocess.image_ops import prepare_input
    from builder.settings import pipeline_settings
    from builder.spec import load_spec

    spec = load_spec(spec_path)
    settings = pipeline_settings(spec)
    tensor, transform = prepare_input(np.full((height, width, 3), 255 if white else 0, np.uint8), spec.input)
    session = ort.InferenceSession(str(spec.model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(spec.output.names), {spec.input_name: tensor[None]})
    boxes, scores, class_ids = postprocess_image([o[0] for o in outputs], settings.postprocess.format, transform,
                                                 **settings.postprocess.options())
    return [(spec.classes[c], [float(v) for v in b], float(s)) for b, s, c in zip(boxes, scores, class_ids)]


def assert_detections(found: list[tuple[str, list[float], float]], width: int, height: int, white: bool) -> None:
    expected = expected_detections(width, height, white)
    assert [name for name, _, _ in found] == [name for name, _, _ in expected]
    for (_, box, score), (_, want_box, want_score) in zip(found, expected):
        np.testing.assert_allclose(box, want_box, atol=1e-3)
        assert abs(score - want_score) < 1e-4
