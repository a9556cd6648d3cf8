"""builder.optimize.pipeline end to end on a small set: variants built, measured, reported, picked, servable."""
import json
import shutil

import pytest

from builder.errors import BuilderError
from builder.optimize.calibration import CalibrationError
from builder.optimize.pipeline import DEFAULT_ACCURACY_FLOOR, OptimizeSettings, optimize
from builder.optimize.variants import load_variant
from builder.repository import render_repository
from builder.spec import load_spec
from tests.conftest import IMAGES, SPEC


@pytest.fixture()
def small_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("dog.jpg", "horses.jpg", "astronaut.png"):
        shutil.copy(IMAGES / name, folder / name)
    return folder


@pytest.mark.slow
def test_optimize_builds_measures_reports_and_picks(tmp_path, small_images):
    spec = load_spec(SPEC)
    settings = OptimizeSettings(calibration_dir=small_images, eval_dir=small_images, out_dir=tmp_path / "opt",
                                variants=("fp32", "ov-fp32"), calibration_count=2, latency_runs=3,
                                throughput_seconds=0.2, accuracy_floor=0.9)
    result = optimize(spec, settings, log=lambda _: None)
    names = [row["name"] for row in result["rows"]]
    assert names == ["fp32", "ov-fp32"]
    assert all(row["map50"] > 0.9 and row["p50_ms"] > 0 for row in result["rows"])
    picked, reason = result["selection"]
    assert picked is not None and picked["name"] in names and "picked" in reason
    for key in ("json", "md", "png"):
        assert result["report"][key].is_file()
    assert "ov-fp32" in result["report"]["md"].read_text()
    report = json.loads(result["report"]["json"].read_text())
    assert [v["name"] for v in report["variants"]] == names
    variant, manifest = load_variant(tmp_path / "opt" / "variants" / "ov-fp32")
    assert manifest["files"] and variant.runtime == "openvino"
    repo = render_repository(spec.replace(target="intel"), tmp_path / "repo", variant=variant)
    assert (repo / f"{spec.name}_detector" / "1" / "model.xml").is_file()


def test_too_few_calibration_images_fail_before_any_work(tmp_path, small_images):
    settings = OptimizeSettings(calibration_dir=small_images, eval_dir=small_images, out_dir=tmp_path / "opt",
                                variants=("fp32",), calibration_count=10)
    with pytest.raises(CalibrationError, match="asked for 10 images but .* has only 3"):
        optimize(load_spec(SPEC), settings, log=lambda _: None)
    assert not (tmp_path / "opt").exists()


@pytest.fixture()
def avx2_host(monkeypatch):
    """This machine as an x86 CPU without VNNI: the class the INT8 settings and `verified_on` follow."""
    monkeypatch.setenv("EDGESTACK_DEVICE_CLASS", "x86-avx2")


@pytest.mark.slow
def test_default_floor_refuses_a_broken_int8_and_the_report_says_why(tmp_path, small_images, avx2_host):
    """The decode tail quantized (keep_head_float=False) collapses every score: under the default 0.90 floor on any
    CPU. The INT8 variant is built with x86-avx2's settings, recorded in variant.json and manifest.json."""
    settings = OptimizeSettings(calibration_dir=small_images, eval_dir=small_images, out_dir=tmp_path / "opt",
                                variants=("fp32", "int8-minmax"), calibration_count=2, latency_runs=3,
                                throughput_seconds=0.2, keep_head_float=False)
    assert settings.accuracy_floor == DEFAULT_ACCURACY_FLOOR == 0.9
    result = optimize(load_spec(SPEC), settings, log=lambda _: None)
    fp32, int8 = result["rows"]
    assert int8["map50"] < DEFAULT_ACCURACY_FLOOR <= fp32["map50"]
    picked, reason = result["selection"]
    assert picked["name"] == "fp32" and f"rejected {int8['name']}: mAP@0.5" in reason
    assert int8["refused"] == f"mAP@0.5 {int8['map50']:.3g} < 0.9 floor" and fp32["refused"] is None
    assert f"- {int8['name']}: mAP@0.5" in result["report"]["md"].read_text().split("## Refused")[1]
    report = json.loads(result["report"]["json"].read_text())
    assert [v["refused"] for v in report["variants"]] == [None, int8["refused"]]
    record = json.loads((tmp_path / "opt" / "variants" / "int8-minmax" / "variant.json").read_text())
    assert record["options"]["reduce_range"] is True  # x86-avx2's settings: 7-bit weights
    manifest = json.loads((tmp_path / "opt" / "variants" / "int8-minmax" / "manifest.json").read_text())
    for classes in (record["device_classes"], manifest["device_classes"], record["manifest"]["device_classes"]):
        assert "x86-avx2" in classes["built_for"] and "x86-vnni" in classes["built_for"]
        assert classes["verified_on"] == ["x86-avx2"]


@pytest.mark.slow
def test_int8_for_another_class_is_unverified_and_still_servable(tmp_path, small_images, avx2_host):
    """--device-class x86-vnni on an x86-avx2 machine: full-range U8S8, which this machine cannot compute exactly, so
    its measured fidelity verifies nothing; the variant still renders with `edgestack build --variant`."""
    settings = OptimizeSettings(calibration_dir=small_images, eval_dir=small_images, out_dir=tmp_path / "opt",
                                variants=("fp32", "int8-minmax"), calibration_count=2, latency_runs=3,
                                throughput_seconds=0.2, device_class="x86-vnni", accuracy_floor=0.0)
    result = optimize(load_spec(SPEC), settings, log=lambda _: None)
    variant, manifest = load_variant(tmp_path / "opt" / "variants" / "int8-minmax")
    assert variant.options["reduce_range"] is False
    classes = manifest["device_classes"]
    assert "x86-vnni" in classes["built_for"] and "x86-avx2" not in classes["built_for"]
    assert classes["verified_on"] == [] and "unverified" in classes["notes"]["x86-vnni"]
    assert "unverified" in result["report"]["md"].read_text().split("## Device classes")[1]
    fp32 = json.loads((tmp_path / "opt" / "variants" / "fp32" / "variant.json").read_text())["device_classes"]
    assert fp32["verified_on"] == ["x86-avx2"]
    spec = load_spec(SPEC)
    repo = render_repository(spec, tmp_path / "repo", variant=variant)
    assert (repo / f"{spec.name}_detector" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("changes,message", [({"accuracy_floor": 1.5}, "accuracy floor"),
                                             ({"device_class": "x86-avx3"}, "device class")])
def test_bad_floor_or_device_class_fail_before_any_work(tmp_path, small_images, changes, message):
    with pytest.raises(BuilderError, match=message):
        OptimizeSettings(calibration_dir=small_images, eval_dir=small_images, out_dir=tmp_path / "opt", **changes)
