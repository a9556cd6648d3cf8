"""A trained or pruned copy back to the served interface: ONNX opset 17 with the source's layout and decode tail.

export_student(copy, out_dir):
1. fold_batchnorms on a clone (fold.py): no batchnorm reaches the served graph;
2. torch.onnx.export (TorchScript exporter, opset 17, batch 1 like the source) of the copy, its input and outputs
   named after the cut's tensors (HeadCut.trainable_input, HeadCut.heads); the asymmetric Resize exports itself as
   the ONNX Resize it came from, onnx2torch's modules as their ONNX ops;
3. stitched into the source model: the source's trainable nodes (everything between the input Transpose and the
   heads) are replaced by the student's (their tensors and initializers prefixed `student/`), the input Transpose
   and the decode tail are kept as they are, the source upgraded to opset 17 first (onnx.version_converter). The
   served interface (input and output names, shapes, dtypes) is the source's, checked, so the spec, the ensemble
   and the postprocess serve it unchanged;
4. onnx.checker.check_model(full_check=True), then ONNX Runtime on the stitched model against the PyTorch copy on
   the given images (the served heatmap is the Sigmoid of the copy's logits, NHWC): ExportCheck.

build_student_variant(copy, out_dir, name, calibration=None | CalibrationSet, device_class=None) writes a variant
folder like `edgestack optimize` does (model.onnx + manifest + variant.json): FP32 (the exported model), or INT8 by
the builder's own recipe (FAST_INT8, the device class's settings from builder.optimize.int8_classes, the decode
tail kept float by default_head_exclusions) when calibration is given. `edgestack build SPEC --variant DIR` serves it.
"""
from __future__ import annotations

import copy as copy_module
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.compress import CompressError
from builder.compress.fold import fold_batchnorms
from builder.compress.torch_copy import HEAD_ROLES, HeadCut, TrainableCopy, nhwc_to_input

OPSET = 17
MODEL_FILE = "model.onnx"
PREFIX = "student/"


@dataclass(frozen=True)
class ExportCheck:
    """Stitched model vs the PyTorch copy on the same images: max abs difference per served map output; passed
    when each is within atol + rtol * the map's max abs value (float rounding: the size map is in pixels)."""

    max_abs_diff: dict[str, float]
    reference_max_abs: dict[str, float]
    images: int
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return all(v <= self.atol + self.rtol * self.reference_max_abs[k] for k, v in self.max_abs_diff.items())

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "reference_max_abs": self.reference_max_abs,
                "images": self.images, "atol": self.atol, "rtol": self.rtol, "passed": self.passed}


def _export_cut(module: torch.nn.Module, cut: HeadCut, path: Path) -> None:
    n, h, w, c = cut.input_shape
    example = torch.zeros((1, c, h, w))
    module.eval()
    try:
        with torch.no_grad():
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[cut.trainable_input], output_names=[cut.heads[r] for r in HEAD_ROLES],
                              do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many unrelated types
        raise CompressError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc


def _trainable_nodes(graph, cut: HeadCut) -> set[int]:
    """Indices of the source nodes between trainable_input and the heads (what the copy replaces)."""
    producers = {o: i for i, node in enumerate(graph.node) for o in node.output}
    found: set[int] = set()
    stack = [cut.heads[r] for r in HEAD_ROLES]
    while stack:
        tensor = stack.pop()
        if tensor == cut.trainable_input or tensor not in producers:
            continue
        index = producers[tensor]
        if index in found:
            continue
        found.add(index)
        stack.extend(i for i in graph.node[index].input if i)
    return found


def _rename(student, keep: set[str]) -> None:
    def name(value: str) -> str:
        return value if not value or value in keep else PREFIX + value

    for init in student.graph.initializer:
        init.name = name(init.name)
    for node in student.graph.node:
        node.name = PREFIX + (node.name or node.op_type)
        for i, value in enumerate(node.input):
            node.input[i] = name(value)
        for i, value in enumerate(node.output):
            node.output[i] = name(value)


def stitch(source: Path, student_cut: Path, cut: HeadCut, out_path: Path) -> None:
    """Write the source model with its trainable nodes replaced by the student cut's (see the module docstring)."""
    import onnx
    from onnx import helper, version_converter

    model = onnx.load(str(source))
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default > OPSET:
        raise CompressError(f"{Path(source).name}: default-domain opset {default} cannot be exported at {OPSET}")
    if default < OPSET:
        model = version_converter.convert_version(model, OPSET)
    student = onnx.load(str(student_cut))
    _rename(student, {cut.trainable_input, *cut.heads.values()})
    graph = model.graph
    replaced = _trainable_nodes(graph, cut)
    kept = [n for i, n in enumerate(graph.node) if i not in replaced]
    head_tensors = set(cut.heads.values())
    tail, prefix, downstream = [], [], set(head_tensors)
    for node in kept:
        if any(i in downstream for i in node.input):
            tail.append(node)
            downstream.update(node.output)
        else:
            prefix.append(node)
    nodes = [*prefix, *student.graph.node, *tail]
    used = {i for n in nodes for i in n.input}
    initializers = [t for t in graph.initializer if t.name in used and not t.name.startswith(PREFIX)]
    initializers += list(student.graph.initializer)
    new_graph = helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output), initializers)
    opsets = [helper.make_opsetid("", OPSET)] + [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    stitched = helper.make_model(new_graph, opset_imports=opsets, producer_name="edgestack.compress",
                                 ir_version=max(model.ir_version, 8))
    stitched = onnx.shape_inference.infer_shapes(stitched, strict_mode=True)
    onnx.checker.check_model(stitched, full_check=True)
    _check_interface(model, stitched)
    onnx.save(stitched, str(out_path))


def _interface(model) -> list[tuple[str, int, tuple[int, ...]]]:
    def describe(v):
        t = v.type.tensor_type
        return (v.name, t.elem_type, tuple(d.dim_value for d in t.shape.dim))

    initializers = {i.name for i in model.graph.initializer}
    return [describe(v) for v in model.graph.input if v.name not in initializers] + \
        [describe(v) for v in model.graph.output]


def _check_interface(source, stitched) -> None:
    if _interface(source) != _interface(stitched):
        raise CompressError(f"the exported model's interface {_interface(stitched)} differs from the source's "
                            f"{_interface(source)}")


def served_maps(copy: TrainableCopy, batch_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """What the stitched model serves for the heads, computed by the copy: role -> NHWC map (heatmap: Sigmoid)."""
    copy.module.eval()
    with torch.no_grad():
        outputs = copy.module(torch.from_numpy(nhwc_to_input(batch_nhwc)))
    maps = dict(zip(HEAD_ROLES, outputs))
    maps["heatmap_logits"] = torch.sigmoid(maps["heatmap_logits"])
    return {role: maps[role].permute(0, 2, 3, 1).numpy() for role in HEAD_ROLES}


def _served_output_of(model_path: Path, cut: HeadCut) -> dict[str, str]:
    """role -> the served output name carrying that head (walking forward through Transpose / Sigmoid)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    found = {}
    for role in HEAD_ROLES:
        tensor = cut.heads[role]
        for _ in range(4):
            if tensor in outputs:
                found[role] = tensor
                break
            nxt = [n for n in graph.node if tensor in n.input and n.op_type in ("Transpose", "Sigmoid")]
            if not nxt:
                break
            tensor = nxt[0].output[0]
    return found


def check_export(model_path: Path, copy: TrainableCopy, batch_nhwc: np.ndarray, atol: float = 1e-4,
                 rtol: float = 5e-5, threads: int = 1) -> ExportCheck:
    """ONNX Runtime on the stitched model vs the copy: max abs difference of each served map."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = _served_output_of(model_path, copy.cut)
    if set(names) != set(HEAD_ROLES):
        raise CompressError(f"{model_path}: served outputs for the heads not found (found {names})")
    expected = served_maps(copy, batch_nhwc)
    diff, ref = {}, {}
    for image_index, image in enumerate(batch_nhwc):
        got = session.run([names[r] for r in HEAD_ROLES], {copy.cut.input_name: image[None].astype(np.float32)})
        for role, value in zip(HEAD_ROLES, got):
            d = float(np.max(np.abs(value[0] - expected[role][image_index])))
            diff[names[role]] = max(diff.get(names[role], 0.0), d)
            ref[names[role]] = max(ref.get(names[role], 0.0), float(np.max(np.abs(expected[role][image_index]))))
    return ExportCheck(diff, ref, len(batch_nhwc), atol, rtol)


def export_student(copy: TrainableCopy, out_path: Path, check_images: np.ndarray | None = None, *,
                   atol: float = 1e-4, rtol: float = 5e-5) -> tuple[Path, ExportCheck | None]:
    """Fold, export and stitch the copy into out_path (a .onnx file); check it against the copy on check_images.

    atol, rtol: ExportCheck's tolerance on the served maps; a failed check raises."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    folded = TrainableCopy(copy_module.deepcopy(copy.module), copy.cut, dict(copy.rewrites))
    fold_batchnorms(folded.module)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        cut_path = Path(work) / "student_cut.onnx"
        _export_cut(folded.module, copy.cut, cut_path)
        staged = Path(work) / out_path.name
        try:
            stitch(copy.cut.source, cut_path, copy.cut, staged)
        except CompressError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx's checker, shape inference and converter raise their own
            raise CompressError(f"the exported student does not form a valid model: {type(exc).__name__}: {exc}") \
                from exc
        check = None
        if check_images is not None:
            check = check_export(staged, copy, np.asarray(check_images, dtype=np.float32), atol, rtol)
            if not check.passed:
                raise CompressError(f"the exported student differs from its PyTorch copy: {check.to_dict()}")
        shutil.move(str(staged), str(out_path))
    return out_path, check


def build_student_variant(student_onnx: Path, out_dir: Path, name: str, spec: Any, *, calibration: Any = None,
                          device_class: str | None = None, metrics: dict | None = None,
                          record: dict | None = None) -> Any:
    """A variant folder of an exported student (model.onnx, manifest.json, variant.json) that `edgestack build SPEC
    --variant out_dir` serves.

    calibration None: FP32 (ORT's portable BASIC offline optimization, like the optimizer's fp32). A CalibrationSet:
    INT8 by the builder's recipe, FAST_INT8 with the device class's settings (int8_classes.settings_for; None: this
    machine's class) and the decode tail kept float. record: how the student was made (pruning, training), stored
    in the variant's options; metrics: stored in the manifest."""
    import dataclasses

    from builder.device_class import host_class
    from builder.optimize import int8_classes
    from builder.optimize import ort_variants as ort
    from builder.optimize.manifest import build_manifest, write_manifest
    from builder.optimize.ort_common import sha256_file
    from builder.optimize.variants import save_variant

    student_onnx, out_dir = Path(student_onnx), Path(out_dir)
    if not student_onnx.is_file():
        raise CompressError(f"exported student {student_onnx} does not exist")
    target = device_class or host_class()
    if calibration is None:
        variant = ort.build_fp32(student_onnx, out_dir)
    else:
        isa = int8_classes.settings_for(target)
        options = ort.QuantOptions(**{"per_channel": True, **ort.FAST_INT8, **isa.ort},
                                   exclude_nodes=ort.default_head_exclusions(student_onnx))
        variant = ort.build_int8(student_onnx, out_dir, calibration, spec.input_name, options)
    options = {**variant.options, "compress": {**(record or {}), "student_sha256": sha256_file(student_onnx),
                                               "teacher_sha256": sha256_file(spec.model_path)}}
    variant = dataclasses.replace(variant, name=name, options=options)
    classes = int8_classes.artifact_classes(int8_classes.built_for(variant), host_class(), target).to_dict()
    manifest = build_manifest(variant, source_model=student_onnx, spec=spec,
                              calibration_sha256=variant.options.get("calibration_sha256"), metrics=metrics or {},
                              device_classes=classes)
    write_manifest(manifest, out_dir)
    save_variant(variant, manifest, device_classes=classes)
    return variant
