"""The spec's detector at another input size: a fixed-size ONNX graph rewritten for a smaller (faster) input.

Fully convolutional detectors keep their fixed size only in the input's shape and in a few constants of the head:
the grid's side (input / stride) and its area, used to reshape and decode the heatmaps. Those constants are
rescaled for every stride that divides the input; the rewritten graph is then run once on a blank input, so a
graph this does not fit is refused at build time, not on the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from builder.errors import BuilderError

STRIDES = (4, 8, 16, 32)
_SHAPE_OPS = ("Reshape",)  # shape tensors: a grid area (h*w) or side may appear as an element
_SCALAR_OPS = ("Div", "Mul")  # scalars: a grid side used to turn a flat index into x, y


def _grid_values(old_h: int, old_w: int, new_h: int, new_w: int) -> dict[int, int]:
    mapping = {}
    for s in STRIDES:
        if old_h % s or old_w % s or new_h % s or new_w % s:
            continue
        mapping[(old_h // s) * (old_w // s)] = (new_h // s) * (new_w // s)
        if old_h == old_w and new_h == new_w:
            mapping[old_h // s] = new_h // s
    return mapping


def resize_input(source: Path, dest: Path, input_name: str, layout: str, height: int, width: int) -> Path:
    """Write source's graph with input input_name of height x width (layout NHWC or NCHW) to dest."""
    model = onnx.load(str(source))
    inputs = {i.name: i for i in model.graph.input}
    if input_name not in inputs:
        raise BuilderError(f"model {source} has no input {input_name!r}")
    dims = inputs[input_name].type.tensor_type.shape.dim
    h_axis, w_axis = (1, 2) if layout == "NHWC" else (2, 3)
    if len(dims) != 4 or not dims[h_axis].dim_value or not dims[w_axis].dim_value:
        raise BuilderError(f"model {source} input {input_name!r} has no fixed size to change: {dims}")
    old_h, old_w = dims[h_axis].dim_value, dims[w_axis].dim_value
    mapping = _grid_values(old_h, old_w, height, width)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    for init in model.graph.initializer:
        ops = users.get(init.name, set())
        array = numpy_helper.to_array(init)
        if array.dtype.kind not in "iu":
            continue
        if (ops & set(_SHAPE_OPS) and array.ndim == 1) or (ops & set(_SCALAR_OPS) and array.size == 1):
            if array.ndim == 1 and ops & set(_SHAPE_OPS) and not (array.size >= 2 and array[0] in mapping):
                continue  # only a leading grid area/side: [h*w, C] -- a channel count never moves
            changed = np.array([mapping.get(int(v), int(v)) for v in array.reshape(-1)], dtype=array.dtype).reshape(array.shape)
            init.CopyFrom(numpy_helper.from_array(changed, init.name))
    dims[h_axis].dim_value, dims[w_axis].dim_value = height, width
    del model.graph.value_info[:]
    for out in model.graph.output:  # spatial output sizes follow the input: leave them to the runtime
        for d in out.type.tensor_type.shape.dim[1:]:
            if d.dim_value in {old_h // s for s in STRIDES} | {old_w // s for s in STRIDES}:
                d.dim_param = "grid"
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    _trial_run(dest, input_name, layout, height, width)
    return dest


def _trial_run(path: Path, input_name: str, layout: str, height: int, width: int) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = {i.name: i for i in session.get_inputs()}[input_name]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}[meta.type]
        shape = (1, height, width, 3) if layout == "NHWC" else (1, 3, height, width)
        session.run(None, {input_name: np.zeros(shape, dtype)})
    except Exception as exc:  # noqa: BLE001 - any failure means the graph cannot take this size
        raise BuilderError(f"the model cannot be resized to {width}x{height}: a trial run failed: {exc}") from None
