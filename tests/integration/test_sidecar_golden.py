"""A golden set made by the project (sidecar.golden: the reference FP32 pipeline on the repository's settings)
at the health gate of a real tritonserver: it refuses a broken INT8 model, and passes the FP32 model it was
made from as served (input-fused graph, Triton, the gate's own pre/postprocess).

The broken model is ONNX Runtime min/max INT8 with the decode tail quantized too, calibrated on the first 3 photos
(the negative control of test_int8_served.py, the same build: tests/variants.py): its scores collapse on every x86
CPU class, so none of the set's confident detections is reproduced. Runs on the session's shared sidecar server (sidecar_support).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.device_class import ArtifactClasses, target_classes
from builder.input_fusion import fuse_input_conversion
from builder.spec import load_spec
from sidecar.bundle import create_bundle
from sidecar.errors import HealthGateError
from sidecar.golden import make_golden_set, reference_from_repository
from tests.conftest import IMAGES, SPEC
from tests.variants import ORT_CALIBRATION_IMAGES
from tests.integration.sidecar_support import DETECTOR, EXPIRES, make_variant
from tests.integration.test_sidecar_swap import _assert_rolled_back

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swap_env(fixture_sidecar_env):
    """The sidecar server with the fixture detector (sidecar_support), serving v1."""
    fixture_sidecar_env.reset_to_v1()
    return fixture_sidecar_env

GOLDEN_IMAGES = [IMAGES / name for name in ("dog.jpg", "horses.jpg", "person.jpg")]


@pytest.fixture(scope="module")
def golden(swap_env) -> dict:
    """The project-made set, with the settings and source model the served repository was rendered from."""
    return make_golden_set(reference_from_repository(swap_env.repository, DETECTOR), GOLDEN_IMAGES)


def _broken_int8(swap_env, shared_variants) -> Path:
    """v1's folder with its model replaced by the broken INT8 graph, input-fused like v1's."""
    from builder.optimize import ort_variants as ov

    spec = load_spec(SPEC)
    broken = shared_variants.ort_int8(ov.QuantOptions(calibration="minmax"), ORT_CALIBRATION_IMAGES)
    folder = swap_env.tmp / "variants" / "broken-int8"
    shutil.copytree(swap_env.repository / DETECTOR / "1", folder, ignore=shutil.ignore_patterns("__pycache__"))
    fuse_input_conversion(broken.path, folder / "model.onnx", spec.input_name, spec.input)
    return folder


def test_project_made_golden_set_refuses_a_broken_int8_model(swap_env, make_agent, golden, shared_variants):
    bundle = create_bundle(_broken_int8(swap_env, shared_variants), swap_env.tmp / "broken-int8.bundle", model_name=DETECTOR,
                           model_version="1.30.0", target="cpu", metadata_version=30, keys=swap_env.keys.bundle,
                           expires=EXPIRES, expected_outputs=golden["expected_outputs"], golden=golden["golden"],
                           device_classes=ArtifactClasses(target_classes("cpu")))
    agent = make_agent()
    with pytest.raises(HealthGateError) as err:
        agent.install(bundle)
    message = str(err.value)
    assert "v2 does not reproduce 3 of 3 expected outputs" in message, message
    for index, path in enumerate(GOLDEN_IMAGES):  # every image is checked and named, not only the first
        assert f"expected output {index} ({path.name}) differs" in message, message
    _assert_rolled_back(swap_env, agent, "does not reproduce 3 of 3 expected outputs")


def test_project_made_golden_set_passes_the_fp32_model_it_was_made_from(swap_env, make_agent, golden):
    same = make_variant(swap_env.repository / DETECTOR / "1", swap_env.tmp / "variants" / "golden-same", "same")
    bundle = create_bundle(same, swap_env.tmp / "golden-same.bundle", model_name=DETECTOR, model_version="1.31.0",
                           target="cpu", metadata_version=31, keys=swap_env.keys.bundle, expires=EXPIRES,
                           expected_outputs=golden["expected_outputs"], golden=golden["golden"])
    agent = make_agent()
    status = agent.install(bundle)
    assert status["state"] == "DONE" and status["current"] == 2, status
    gate = next(e for e in agent.history() if e["event"] == "gate_passed")
    assert gate["expected_outputs_checked"] == len(GOLDEN_IMAGES)
