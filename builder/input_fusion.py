"""Move the input's dtype conversion and scaling into the ONNX graph, so the image travels as uint8.

Between Python-backend steps every tensor is copied through shared memory; a 512x512x3 float32 image is
3 MiB, its uint8 form 0.75 MiB. The fused graph takes the resized uint8 pixels (same name, shape and
layout) and starts with Cast -> Mul(scale) -> Sub(mean) -> Div(std), each only where it changes values.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.preprocess.image_ops import InputSpec
from builder.errors import BuilderError


def _channel_constant(values: tuple[float, ...], layout: str, dtype: np.dtype) -> np.ndarray:
    array = np.asarray(values, dtype=dtype)
    return array.reshape(1, 3, 1, 1) if layout == "NCHW" else array.reshape(1, 1, 1, 3)


def transport_spec(spec: InputSpec) -> InputSpec:
    """What preprocess emits when the conversion is fused: the resized pixels, uint8, same layout."""
    return InputSpec(height=spec.height, width=spec.width, layout=spec.layout, channel_order=spec.channel_order,
                     dtype="uint8", resize=spec.resize, pad_value=spec.pad_value)


def fuse_input_conversion(model_path: Path, out_path: Path, input_name: str, spec: InputSpec) -> None:
    """Write a copy of the model whose input `input_name` is uint8 and converted inside the graph."""
    model = onnx.load(str(model_path))
    graph = model.graph
    graph_input = next((i for i in graph.input if i.name == input_name), None)
    if graph_input is None:
        raise BuilderError(f"{model_path} has no input {input_name!r}")
    float_type = graph_input.type.tensor_type.elem_type
    if float_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise BuilderError(f"input {input_name!r} is not float; nothing to fuse")
    np_dtype = helper.tensor_dtype_to_np_dtype(float_type)

    internal = f"{input_name}__converted"
    for node in graph.node:
        node.input[:] = [internal if name == input_name else name for name in node.input]
    for output in graph.output:
        if output.name == input_name:
            raise BuilderError(f"input {input_name!r} is also a graph output; cannot fuse")

    steps: list[tuple[str, np.ndarray | None]] = [("Cast", None)]
    if spec.scale != 1.0:
        steps.append(("Mul", np.asarray(spec.scale, dtype=np_dtype)))
    if any(m != 0.0 for m in spec.mean):
        steps.append(("Sub", _channel_constant(spec.mean, spec.layout, np_dtype)))
    if any(s != 1.0 for s in spec.std):
        steps.append(("Div", _channel_constant(spec.std, spec.layout, np_dtype)))

    nodes, current = [], input_name
    for index, (op, constant) in enumerate(steps):
        result = internal if index == len(steps) - 1 else f"{input_name}__step{index}"
        if op == "Cast":
            nodes.append(helper.make_node("Cast", [current], [result], to=float_type, name=f"{input_name}__cast"))
        else:
            const_name = f"{input_name}__{op.lower()}_value"
            graph.initializer.append(numpy_helper.from_array(constant, const_name))
            nodes.append(helper.make_node(op, [current, const_name], [result], name=f"{input_name}__{op.lower()}"))
        current = result
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    graph_input.type.tensor_type.elem_type = TensorProto.UINT8
    onnx.checker.check_model(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
