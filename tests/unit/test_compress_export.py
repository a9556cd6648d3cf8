"""builder.compress.export: a copy back to the served interface, and a variant folder `edgestack build` serves.

The unpruned copy exported and stitched must be the teacher again (same interface, same detections), which checks
the whole round trip ONNX -> PyTorch -> ONNX; a pruned copy must keep the interface and shrink the file.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder.compress import CompressError, set_torch_threads
from builder.compress import export as ex
from builder.compress import prune as pr
from builder.compress import torch_copy as tc
from builder.optimize import evaluate
from builder.optimize.evaluate import prepare_image
from builder.optimize.pipeline import make_runner
from builder.optimize.variants import Variant, load_variant
from builder.spec import load_spec
from tests.conftest import FIXTURES, IMAGES, MODEL, SPEC

set_torch_threads(1)


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> tc.TrainableCopy:
    return tc.to_torch(MODEL, tmp_path_factory.mktemp("export_copy"), threads=1)


@pytest.fixture(scope="module")
def photos(spec) -> np.ndarray:
    return np.stack([prepare_image(spec, IMAGES / name)[0] for name in ("dog.jpg", "person.jpg")])


@pytest.fixture(scope="module")
def unpruned(copy, photos, tmp_path_factory):
    return ex.export_student(copy, tmp_path_factory.mktemp("unpruned") / "student.onnx", photos)


@pytest.fixture(scope="module")
def pruned(copy, spec, photos, tmp_path_factory):
    unlabelled = np.stack([prepare_image(spec, p)[0] for p in sorted((FIXTURES / "images_more").iterdir())[:3]])
    result = pr.prune(copy, pr.PruneSettings(0.5, "bn-scale"), unlabelled)
    path, check = ex.export_student(result.copy, tmp_path_factory.mktemp("pruned") / "student.onnx", photos)
    return result, path, check


def interface(path) -> list:
    model = onnx.load(str(path))
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*model.graph.input, *model.graph.output)]


def test_unpruned_export_is_the_teacher(unpruned, photos):
    path, check = unpruned
    print(f"\nexport check: {check.to_dict()}")
    assert check.passed
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") == ex.OPSET
    assert interface(path) == interface(MODEL)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 3 and all(
        onnx.helper.get_attribute_value(a) == b"asymmetric"
        for n in resizes for a in n.attribute if a.name == "coordinate_transformation_mode")
    teacher = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    student = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = teacher.get_inputs()[0].name
    for image in photos:
        expected = dict(zip([o.name for o in teacher.get_outputs()], teacher.run(None, {name: image[None]})))
        got = dict(zip([o.name for o in student.get_outputs()], student.run(None, {name: image[None]})))
        detections, reference = got["tower_0/detections"][0], expected["tower_0/detections"][0]
        confident = reference[:, 4] >= 0.35
        assert confident.any()
        np.testing.assert_array_equal(detections[confident, 5], reference[confident, 5])
        np.testing.assert_allclose(detections[confident, :5], reference[confident, :5], atol=0.05)


def test_pruned_export_keeps_the_interface(pruned):
    result, path, check = pruned
    assert check.passed, check.to_dict()
    assert interface(path) == interface(MODEL)
    assert path.stat().st_size < 0.5 * MODEL.stat().st_size
    print(f"\npruned 50% bn-scale: {path.stat().st_size:,} bytes (teacher {MODEL.stat().st_size:,}), "
          f"{result.params_after:,} parameters")


def test_fp32_variant_folder(pruned, spec, tmp_path):
    result, path, _ = pruned
    variant = ex.build_student_variant(path, tmp_path / "r50-fp32", "r50-fp32", spec, record=result.to_dict(),
                                       metrics={"map50": None})
    loaded, manifest = load_variant(tmp_path / "r50-fp32")
    assert loaded.name == variant.name == "r50-fp32" and loaded.precision == "fp32"
    assert loaded.options["compress"]["name"] == "pruned50-bn-scale"
    assert manifest["source_model"]["sha256"] == loaded.options["compress"]["student_sha256"]
    assert json.loads((tmp_path / "r50-fp32" / "variant.json").read_text())["device_classes"]["built_for"]


@pytest.mark.slow
def test_int8_variant_of_the_unpruned_export_stays_faithful(unpruned, spec, tmp_path):
    """The builder's INT8 recipe on the round-tripped model keeps the fidelity `edgestack optimize` gets."""
    from builder.optimize.calibration import load_calibration_set

    calibration = load_calibration_set(FIXTURES / "images_more", spec.input, spec.limits, 3)
    variant = ex.build_student_variant(unpruned[0], tmp_path / "int8", "r0-int8", spec, calibration=calibration)
    assert variant.precision == "int8" and variant.options["calibration"] == "mean-quantile"
    images = sorted(IMAGES.iterdir())
    teacher = Variant("teacher", "onnxruntime", "fp32", spec.model_path)
    reference = evaluate.detect_images(make_runner(teacher, spec, 1, 1), spec, images)
    detections = evaluate.detect_images(make_runner(variant, spec, 1, 1), spec, images)
    fidelity = evaluate.fidelity_map(reference, detections, reference_score_threshold=spec.thresholds.score)
    print(f"\nINT8 of the round-tripped teacher: fidelity mAP@0.5 {fidelity['map50']:.3f}")
    assert fidelity["map50"] >= 0.9


def test_check_export_catches_a_different_model(copy, photos, tmp_path):
    """The export check is not vacuous: a file exported from a changed copy fails against the original copy."""
    import torch

    changed = pr.clone(copy)
    with torch.no_grad():
        pr.head_convolutions(changed)[0].bias.add_(1.0)
    path, _ = ex.export_student(changed, tmp_path / "changed.onnx")
    check = ex.check_export(path, copy, photos[:1])
    assert not check.passed
    assert max(check.max_abs_diff.values()) > 1e-2


def test_missing_student_is_named(spec, tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        ex.build_student_variant(tmp_path / "missing.onnx", tmp_path / "v", "v", spec)
