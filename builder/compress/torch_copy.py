"""A trainable PyTorch copy of a served ONNX detector, proved equal to ONNX Runtime on the same cut.

The trainable part is cut out of the source ONNX with onnx.utils.extract_model, between
- the input's layout Transpose (NHWC -> NCHW): the copy takes NCHW float32 [N, 3, H, W], raw 0..255 like the
  served input (nhwc_to_input converts a served batch), and
- the heads' raw maps, found by walking back from the served map outputs through the layout Transposes and the
  Sigmoid: the class heatmap *logits* (before the Sigmoid; distillation divides them by a temperature) and the
  size map as served (for the fixture CenterNet: `.../centernet_cls_output/BiasAdd...:0` [1, 80, 128, 128] and
  `tower_0/mul:0` [1, 4, 128, 128], in input pixels).
The decode tail (Sigmoid, Transposes, peak MaxPool, TopK, box arithmetic) stays in ONNX; export re-attaches it.

Before conversion the cut graph is rewritten, keeping its values:
- Reshapes whose output shape equals their input shape (tf2onnx leaves 18 in the squeeze-excite blocks, each with
  the channel count written in a constant) are removed: a pruned channel count would contradict the constant.
- Resize nodes with mode=linear and coordinate_transformation_mode=asymmetric become this project's
  `AsymmetricResize` (domain edgestack_compress), converted to AsymmetricLinearResize below. onnx2torch's own
  Resize converter maps every non-align_corners linear Resize to torch's half_pixel interpolation, which is a
  different function (the fixture's heads then differ from ONNX Runtime: heatmap correlation 0.82, 112 px).
  ONNX: x_original = x_resized / scale, linear interpolation between floor(x) and floor(x) + 1, indices clamped
  to the input. AsymmetricLinearResize computes exactly that with index_select (differentiable), and exports
  itself back as an ONNX Resize with the same attributes.

onnx2torch imports torchvision at import time, only for its NonMaxSuppression and RoiAlign converters, which a
detector cut before its decode tail never uses. The project installs onnx2torch without dependencies (no
torchvision: PyPI's build is a CUDA one that does not load beside the CPU torch); import_onnx2torch() puts a
stand-in `torchvision` module in place when none can be imported, whose two ops raise CompressError if ever called.
"""
from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.compress import CompressError

HEAD_ROLES = ("heatmap_logits", "wh")
CUSTOM_DOMAIN = "edgestack_compress"  # no dots: onnx2torch names modules after the domain
RESIZE_OP = "AsymmetricResize"
_LAYOUT = ("Transpose",)
_HEATMAP_ACTIVATION = "Sigmoid"


@dataclass(frozen=True)
class HeadCut:
    """Where the trainable part of a served detector starts and ends.

    input_name / input_perm: the served input and the Transpose that makes it NCHW (trainable_input).
    heads: role (HEAD_ROLES) -> the NCHW tensor the trainable part outputs.
    served_outputs: the source's outputs, re-attached by export in this order.
    """

    source: Path
    input_name: str
    input_perm: tuple[int, ...]
    trainable_input: str
    heads: dict[str, str]
    served_outputs: tuple[str, ...]
    input_shape: tuple[int, ...]  # served (NHWC)
    head_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _producers(graph) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _shapes(model) -> dict[str, tuple[int, ...]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in (*graph.value_info, *graph.input, *graph.output)}


def find_head_cut(source: Path) -> HeadCut:
    """The cut of a CenterNet-style detector: input layout Transpose -> heatmap logits and size map."""
    import onnx

    source = Path(source)
    if not source.is_file():
        raise CompressError(f"source model {source} does not exist")
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise CompressError(f"{source.name}: expected one image input, found {[i.name for i in inputs]}")
    input_name = inputs[0].name
    first = [n for n in _consumers(graph).get(input_name, [])]
    if len(first) != 1 or first[0].op_type != "Transpose":
        raise CompressError(f"{source.name}: input {input_name} does not go through one layout Transpose "
                            f"(consumers: {[n.op_type for n in first]})")
    perm = tuple(onnx.helper.get_attribute_value(a) for a in first[0].attribute if a.name == "perm")[0]
    producers = _producers(graph)
    heads: dict[str, str] = {}
    for output in graph.output:
        name, seen = output.name, []
        while name in producers and producers[name].op_type in (*_LAYOUT, _HEATMAP_ACTIVATION):
            seen.append(producers[name].op_type)
            name = producers[name].input[0]
        if not seen or name == input_name:
            continue  # a detections-style output (decode arithmetic), not a map
        role = "heatmap_logits" if _HEATMAP_ACTIVATION in seen else "wh"
        if role in heads:
            raise CompressError(f"{source.name}: two outputs look like the {role} map: {heads[role]}, {name}")
        heads[role] = name
    missing = [r for r in HEAD_ROLES if r not in heads]
    if missing:
        raise CompressError(f"{source.name}: no {', '.join(missing)} map found behind the outputs "
                            f"{[o.name for o in graph.output]} (expected Transpose [+ Sigmoid] after a head)")
    shapes = _shapes(model)
    return HeadCut(source, input_name, tuple(perm), first[0].output[0], heads,
                   tuple(o.name for o in graph.output), shapes.get(input_name, ()),
                   {r: shapes.get(t, ()) for r, t in heads.items()})


def _remove_identity_reshapes(model) -> list[str]:
    shapes = _shapes(model)
    graph = model.graph
    removed, rename = [], {}
    for node in list(graph.node):
        if node.op_type != "Reshape":
            continue
        before, after = shapes.get(node.input[0]), shapes.get(node.output[0])
        if before and before == after and all(d > 0 for d in before):
            rename[node.output[0]] = node.input[0]
            graph.node.remove(node)
            removed.append(node.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    return removed


def _replace_asymmetric_resizes(model) -> list[str]:
    import onnx

    replaced = []
    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"nearest").decode()
        ctm = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
        if mode != "linear" or ctm != "asymmetric":
            continue
        if len(node.input) < 3 or not node.input[2] or (len(node.input) > 3 and node.input[3]):
            raise CompressError(f"Resize {node.name}: only constant `scales` are supported (no `sizes`)")
        node.op_type, node.domain = RESIZE_OP, CUSTOM_DOMAIN
        del node.attribute[:]
        replaced.append(node.name)
    if replaced and not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return replaced


def trainable_onnx(cut: HeadCut, work_dir: Path):
    """The source model cut to [trainable_input -> heads] (onnx.utils.extract_model), as a ModelProto, unchanged."""
    import onnx

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "trainable_cut.onnx"
    onnx.utils.extract_model(str(cut.source), str(path), [cut.trainable_input],
                             [cut.heads[r] for r in HEAD_ROLES], check_model=True)
    return onnx.load(str(path))


def import_onnx2torch() -> types.ModuleType:
    """onnx2torch, with a stand-in torchvision when the real one is absent or cannot load (see the docstring)."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - absent, or PyPI's CUDA build failing beside the CPU torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = _torchvision_standin()
        sys.modules["torchvision.ops"] = sys.modules["torchvision"].ops
    module = importlib.import_module("onnx2torch")
    _register_resize_converter()
    return module


def _torchvision_standin() -> types.ModuleType:
    def unavailable(name: str):
        def op(*args, **kwargs):
            raise CompressError(f"torchvision.ops.{name} is not installed: this converted model needs it "
                                f"(edgestack cuts detectors before NMS/RoiAlign; see builder/compress/torch_copy.py)")
        return op

    ops = types.ModuleType("torchvision.ops")
    for name in ("nms", "roi_align", "box_convert", "batched_nms"):
        setattr(ops, name, unavailable(name))
    tv = types.ModuleType("torchvision")
    tv.ops = ops
    tv.__version__ = "0+edgestack-standin"
    tv.__edgestack_standin__ = True
    return tv


def _register_resize_converter() -> None:
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    if OperationDescription(CUSTOM_DOMAIN, RESIZE_OP, 1) in _CONVERTER_REGISTRY:
        return

    @add_converter(operation_type=RESIZE_OP, version=1, domain=CUSTOM_DOMAIN)
    def _convert(node, graph) -> OperationConverterResult:
        scales = graph.initializers[node.input_values[2]].to_torch().tolist()
        module = AsymmetricLinearResize(tuple(float(s) for s in scales))
        mapping = onnx_mapping_from_node(node)
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=type(mapping)(inputs=mapping.inputs[:1], outputs=mapping.outputs))


class AsymmetricLinearResize(torch.nn.Module):
    """ONNX Resize(mode=linear, coordinate_transformation_mode=asymmetric) over the spatial axes of NCHW."""

    def __init__(self, scales: tuple[float, ...]):
        super().__init__()
        if len(scales) != 4 or scales[0] != 1.0 or scales[1] != 1.0 or min(scales) <= 0:
            raise CompressError(f"AsymmetricLinearResize resizes H and W of NCHW only, got scales {scales}")
        self.scales = tuple(float(s) for s in scales)

    @staticmethod
    def _axis(x: torch.Tensor, axis: int, scale: float) -> torch.Tensor:
        size = x.shape[axis]
        out = int(np.floor(size * scale))
        src = (torch.arange(out, dtype=torch.float64) / scale).clamp(0, size - 1)
        low = src.floor().long()
        high = (low + 1).clamp(max=size - 1)
        shape = [1] * x.dim()
        shape[axis] = out
        weight = (src - low.to(torch.float64)).to(x.dtype).reshape(shape)
        a, b = x.index_select(axis, low), x.index_select(axis, high)
        return a + (b - a) * weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _ResizeExport.apply(x, torch.tensor(self.scales, dtype=torch.float32))
        return self._axis(self._axis(x, 2, self.scales[2]), 3, self.scales[3])

    def extra_repr(self) -> str:
        return f"scales={self.scales}, mode=linear, coordinate_transformation_mode=asymmetric"


class _ResizeExport(torch.autograd.Function):
    """Exports AsymmetricLinearResize as the ONNX Resize it came from (the forward only gives the exporter shapes)."""

    @staticmethod
    def forward(ctx, x, scales):
        size = [int(np.floor(d * s)) for d, s in zip(x.shape, scales.tolist())]
        return torch.nn.functional.interpolate(x, size=size[2:], mode="nearest")

    @staticmethod
    def symbolic(g, x, scales):
        roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
        return g.op("Resize", x, roi, scales, coordinate_transformation_mode_s="asymmetric", mode_s="linear",
                    nearest_mode_s="floor", exclude_outside_i=0)


@dataclass
class TrainableCopy:
    """A PyTorch module computing the cut's heads, with what export needs to put it back.

    module: NCHW float32 [N, 3, H, W] (raw 0..255) -> (heatmap_logits, wh), NCHW, in HEAD_ROLES order.
    rewrites: what was changed in the cut graph before conversion (identity reshapes removed, resizes replaced).
    """

    module: Any
    cut: HeadCut
    rewrites: dict[str, list[str]]

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        n, h, w, c = self.cut.input_shape
        return (batch, c, h, w)


class DetectorHeads(torch.nn.Module):
    """The converted cut: NCHW image -> (heatmap_logits, wh)."""

    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(x))


def to_torch(source: Path, work_dir: Path, threads: int = 1, *, own_resize: bool = True) -> TrainableCopy:
    """Convert the source detector's trainable cut to PyTorch (onnx2torch + the asymmetric Resize converter).

    own_resize=False leaves the Resize nodes to onnx2torch's converter (half_pixel): only to show the difference."""
    from builder.compress import set_torch_threads

    set_torch_threads(threads)
    cut = find_head_cut(source)
    model = trainable_onnx(cut, work_dir)
    rewrites = {"identity_reshapes_removed": _remove_identity_reshapes(model),
                "asymmetric_resizes": _replace_asymmetric_resizes(model) if own_resize else []}
    onnx2torch = import_onnx2torch()
    try:
        graph_module = onnx2torch.convert(model)
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise CompressError(f"onnx2torch cannot convert {Path(source).name}: {type(exc).__name__}: {exc}") from exc
    module = DetectorHeads(graph_module)
    module.eval()
    return TrainableCopy(module, cut, rewrites)


def nhwc_to_input(batch: np.ndarray) -> np.ndarray:
    """A served-layout batch [N, H, W, 3] as the copy's NCHW float32 input."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4:
        raise CompressError(f"expected a batch [N, H, W, C], got shape {batch.shape}")
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def reference_heads(cut: HeadCut, batch_nhwc: np.ndarray, threads: int = 1) -> dict[str, np.ndarray]:
    """ONNX Runtime's values of the heads on the *source* model (its own input Transpose), one image at a time."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(cut.source))
    known = {o.name for o in model.graph.output}
    for role in HEAD_ROLES:
        if cut.heads[role] not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(cut.heads[role]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [cut.heads[r] for r in HEAD_ROLES]
    per_image = [session.run(names, {cut.input_name: image[None].astype(np.float32)}) for image in batch_nhwc]
    return {role: np.concatenate([o[i] for o in per_image]) for i, role in enumerate(HEAD_ROLES)}


def torch_heads(copy: TrainableCopy, batch_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The copy's heads for a served-layout batch, in eval mode without gradients."""
    copy.module.eval()
    with torch.no_grad():
        outputs = copy.module(torch.from_numpy(nhwc_to_input(batch_nhwc)))
    return {role: outputs[i].numpy() for i, role in enumerate(HEAD_ROLES)}


@dataclass(frozen=True)
class EqualityReport:
    """How far the copy is from ONNX Runtime, per head: max abs difference, the reference's max abs value and the
    Pearson correlation; passed when every max abs difference is within atol + rtol * the reference's max."""

    max_abs_diff: dict[str, float]
    reference_max_abs: dict[str, float]
    correlation: dict[str, float]
    atol: float
    rtol: float
    images: int

    @property
    def passed(self) -> bool:
        return all(self.max_abs_diff[r] <= self.atol + self.rtol * self.reference_max_abs[r] for r in HEAD_ROLES)

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "reference_max_abs": self.reference_max_abs,
                "correlation": self.correlation, "atol": self.atol, "rtol": self.rtol, "images": self.images,
                "passed": self.passed}


def compare_heads(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, atol: float, rtol: float,
                  images: int) -> EqualityReport:
    diff, ref_max, corr = {}, {}, {}
    for role in HEAD_ROLES:
        a = np.asarray(reference[role], dtype=np.float64)
        b = np.asarray(candidate[role], dtype=np.float64)
        if a.shape != b.shape:
            raise CompressError(f"head {role}: shapes differ, reference {a.shape} vs candidate {b.shape}")
        diff[role] = float(np.max(np.abs(a - b)))
        ref_max[role] = float(np.max(np.abs(a)))
        corr[role] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return EqualityReport(diff, ref_max, corr, atol, rtol, images)


def check_equality(copy: TrainableCopy, batch_nhwc: np.ndarray, *, atol: float = 1e-4,
                   rtol: float = 5e-5, threads: int = 1) -> EqualityReport:
    """Compare the copy with ONNX Runtime on the source model for the same images (served layout)."""
    reference = reference_heads(copy.cut, batch_nhwc, threads)
    return compare_heads(reference, torch_heads(copy, batch_nhwc), atol=atol, rtol=rtol, images=len(batch_nhwc))
