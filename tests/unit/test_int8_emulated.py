"""INT8 on an emulated CPU without VNNI: `qemu-x86_64 -cpu Haswell` runs ONNX Runtime's AVX2 kernels here.

The settings builder/optimize/int8_classes.py uses for x86 without VNNI (7-bit weights) are computed exactly by the
AVX2 kernels: the emulated CPU gives this machine's detections. Full-range U8S8 weights are not (VPMADDUBSW's 16-bit
sums saturate): the negative control, where this machine computes them exactly (x86-vnni). One image, about a
minute: qemu runs ~250x slower than the host.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builder.device_class import host_class
from builder.optimize import ort_variants as ov
from builder.optimize.int8_classes import SATURATING_X86, exact_classes, settings_for
from tests.conftest import IMAGES, MODEL, SPEC
from tests.variants import ORT_CALIBRATION_IMAGES

QEMU = shutil.which("qemu-x86_64")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user)")]
ROOT = Path(__file__).resolve().parents[2]
IMAGE = IMAGES / "horses.jpg"  # saturation moves its detections most of the 14 photos (BENCHMARKS.md)

DETECT = """
import json, sys
from backends.detector.onnx_runner import OnnxDetector, make_session
from builder.optimize.evaluate import detect_images
from builder.spec import load_spec
spec_path, image, out, *models = sys.argv[1:]
spec = load_spec(spec_path)
found = {}
for model in models:
    [d] = detect_images(OnnxDetector(make_session(model, 1), spec.input_name, spec.output.name, 1), spec, [image],
                        score_threshold=spec.thresholds.score)
    found[model] = {"boxes": d.boxes.tolist(), "scores": d.scores.tolist(), "class_ids": d.class_ids.tolist()}
open(out, "w").write(json.dumps(found))
"""


def detections(models: dict[str, Path], out: Path, emulate: bool) -> dict[str, dict]:
    """{name: detections on IMAGE} of each model, run in a subprocess (under qemu's Haswell CPU if emulate)."""
    command = [sys.executable, "-c", DETECT, str(SPEC), str(IMAGE), str(out), *map(str, models.values())]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if emulate:
        command = [QEMU, "-cpu", "Haswell", *command]
        env["EDGESTACK_DEVICE_CLASS"] = "x86-avx2"
    subprocess.run(command, check=True, env=env, cwd=ROOT, stderr=subprocess.DEVNULL, timeout=600)
    found = json.loads(out.read_text())
    return {name: found[str(path)] for name, path in models.items()}


def same(a: dict, b: dict) -> bool:
    """Same detections: same classes in the same order, boxes within 1 px, scores within 0.01."""
    return (a["class_ids"] == b["class_ids"] and np.allclose(a["boxes"], b["boxes"], atol=1.0)
            and np.allclose(a["scores"], b["scores"], atol=0.01))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_variants):
    """The FAST_INT8 builds test_ort_variants checks (built once per session, tests/variants.py), run here and on
    the emulated AVX2 CPU."""
    tmp = tmp_path_factory.mktemp("emulated")
    head = ov.default_head_exclusions(MODEL)
    models = {}
    for name, isa in (("portable", settings_for(SATURATING_X86[-1]).ort), ("full-range", {})):
        variant = shared_variants.ort_int8(ov.QuantOptions(**ov.FAST_INT8, **isa, exclude_nodes=head),
                                           ORT_CALIBRATION_IMAGES)
        models[name] = variant.path
    return detections(models, tmp / "host.json", False), detections(models, tmp / "avx2.json", True)


def test_non_vnni_settings_give_the_same_detections_on_avx2(runs):
    host, avx2 = runs
    assert host["portable"]["class_ids"], "no detection on the test image: it tests nothing"
    assert "x86-avx2" in exact_classes(ov.QuantOptions(**ov.FAST_INT8, **settings_for("x86-avx2").ort))
    assert same(host["portable"], avx2["portable"]), (host["portable"], avx2["portable"])


def test_full_range_u8s8_changes_the_detections_on_avx2(runs):
    if host_class() not in exact_classes(ov.QuantOptions(**ov.FAST_INT8)):
        pytest.skip(f"this machine ({host_class()}) computes full-range U8S8 inexactly too: no exact reference here")
    host, avx2 = runs
    assert not same(host["full-range"], avx2["full-range"]), (host["full-range"], avx2["full-range"])
