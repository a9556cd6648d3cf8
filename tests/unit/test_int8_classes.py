"""builder.optimize.int8_classes: INT8 settings per device class and the classes a built model is exact on."""
from __future__ import annotations

from pathlib import Path

import pytest

from builder.device_class import ARM_CLASSES, CPU_CLASSES, X86_CLASSES, ArtifactClasses
from builder.errors import BuilderError
from builder.optimize import int8_classes as ic
from builder.optimize.ort_variants import FAST_INT8, QuantOptions
from builder.optimize.variants import Variant


def test_every_cpu_class_has_settings_and_vnni_alone_keeps_full_range_x86_weights():
    assert set(ic.INT8_CLASSES) == set(CPU_CLASSES)
    for name in CPU_CLASSES:
        settings = ic.settings_for(name)
        options = QuantOptions(**FAST_INT8, **settings.ort)
        # whatever a class builds, its own kernels compute exactly
        assert name in ic.exact_classes(options), name
        if name in X86_CLASSES:  # the intel target (OpenVINO INT8) is x86 only
            assert name in ic.openvino_exact_classes(settings.openvino_overflow_fix), name
    for name in ic.SATURATING_X86:
        assert ic.settings_for(name).ort == {"reduce_range": True}
        assert ic.settings_for(name).openvino_overflow_fix == "enable"
    assert ic.settings_for("x86-vnni").ort == {}


def test_exact_classes_of_full_range_and_narrow_weights():
    assert ic.exact_classes(QuantOptions(**FAST_INT8)) == ("x86-vnni", *ARM_CLASSES)
    for narrow in ({"reduce_range": True}, {"weight_type": "uint8", "per_channel": False}):
        assert ic.exact_classes(QuantOptions(**FAST_INT8, **narrow)) == CPU_CLASSES
    assert ic.openvino_exact_classes("enable") == X86_CLASSES
    for fix in (None, "first_layer_only", "disable"):
        assert ic.openvino_exact_classes(fix) == ("x86-vnni",)


@pytest.mark.parametrize("name", ["cuda-sm87", "x86-avx3", ""])
def test_unknown_or_gpu_class_is_a_builder_error(name):
    with pytest.raises(BuilderError):
        ic.settings_for(name)
    with pytest.raises(BuilderError, match="overflow_fix"):
        ic.openvino_exact_classes("sometimes")


def _variant(runtime: str, precision: str, options: dict, targets=("cpu",)) -> Variant:
    return Variant("v", runtime, precision, Path("model.onnx"), options, targets)


def test_built_for_reads_the_recorded_options():
    full = QuantOptions(**FAST_INT8).as_dict()
    assert ic.built_for(_variant("onnxruntime", "int8", full)) == ("x86-vnni", *ARM_CLASSES)
    assert ic.built_for(_variant("onnxruntime", "int8", {**full, "reduce_range": True})) == CPU_CLASSES
    assert ic.built_for(_variant("openvino", "int8", {"overflow_fix": "enable"}, ("intel",))) == X86_CLASSES
    assert ic.built_for(_variant("openvino", "int8", {"overflow_fix": None}, ("intel",))) == ("x86-vnni",)
    assert ic.built_for(_variant("openvino", "fp32", {}, ("intel",))) == X86_CLASSES
    fp32 = ic.built_for(_variant("onnxruntime", "fp32", {}, ("cpu", "nvidia-gpu", "jetson")))
    assert set(CPU_CLASSES) <= set(fp32) and "cuda-any" in fp32


def test_artifact_classes_verified_only_where_measured():
    verified = ic.artifact_classes(CPU_CLASSES, "x86-avx2", "x86-avx2")
    assert verified.verified_on == ("x86-avx2",) and verified.built_for == CPU_CLASSES
    assert "x86-avx2" not in verified.notes and "exactly" in verified.notes["x86-vnni"]
    unverified = ic.artifact_classes(("x86-vnni", *ARM_CLASSES), "x86-avx2", "x86-vnni")
    assert unverified.verified_on == ()
    assert set(unverified.notes) == {"x86-vnni", *ARM_CLASSES}
    assert all("unverified" in note and "x86-avx2" in note for note in unverified.notes.values())
    assert ArtifactClasses.from_dict(unverified.to_dict()) == unverified
