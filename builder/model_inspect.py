"""Read an ONNX model's interface (tensor names, dtypes, shapes) without running it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from builder.errors import SpecError

DYNAMIC = -1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy name, e.g. "float32"
    shape: tuple[int, ...]  # -1 for a symbolic or unknown dimension


@dataclass(frozen=True)
class ModelInterface:
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph is fixed at, or None when the batch dimension is dynamic."""
        first = next(iter(self.inputs.values()))
        return first.shape[0] if first.shape and first.shape[0] != DYNAMIC else None


def _tensor_info(value_info: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else DYNAMIC for d in tensor_type.shape.dim)
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return TensorInfo(value_info.name, dtype, dims)


def inspect_onnx(path: Path) -> ModelInterface:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise SpecError(f"{path} is not a readable ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = {vi.name: _tensor_info(vi) for vi in model.graph.input if vi.name not in initializers}
    outputs = {vi.name: _tensor_info(vi) for vi in model.graph.output}
    if not inputs or not outputs:
        raise SpecError(f"{path} has no graph inputs or outputs")
    return ModelInterface(inputs, outputs)
