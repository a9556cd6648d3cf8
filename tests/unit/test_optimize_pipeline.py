"""builder.optimize.pipeline end to end on a small set: variants built, measured, reported, picked, servable."""
import json
import shutil

import pytest

from builder.optimize.calibration import CalibrationError
from builder.optimize.pipeline import OptimizeSettings, optimize
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
