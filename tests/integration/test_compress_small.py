"""`edgestack compress` at CI size, end to end, and its distilled INT8 student served by a real tritonserver.

One ratio (0.3), no fine-tuning and distillation (3 steps of batch 1), INT8: the real fixture detector converted to
PyTorch, pruned, trained against the ONNX teacher, exported, quantized and measured on the held-out fixture photos
(never trained on: the training images are images_more). The distilled INT8 variant is then served through the
ensemble with `--variant` and asked over gRPC and HTTP for every held-out photo: the server must answer what the
variant gives in process (the same preprocess, model and postprocess). Training this short proves the machinery,
not the accuracy: the full run's numbers are in docs/COMPRESSION.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURES, IMAGES, SPEC

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = FIXTURES / "images_more"
STEPS = 3
SCORE = 1e-3  # serving threshold of the served student (top candidates; see the served test)


@pytest.fixture(scope="module")
def spec():
    from builder.spec import load_spec

    return load_spec(SPEC)


@pytest.fixture(scope="module")
def run(spec, tmp_path_factory):
    from builder.compress.pipeline import CompressSettings, compress

    out = tmp_path_factory.mktemp("compress_small")
    settings = CompressSettings(out_dir=out, train_dirs=(TRAIN,), eval_dir=IMAGES, ratios=(0.3,),
                                trainings=("none", "distill"), steps=STEPS, batch_size=1, latency_runs=3, threads=1)
    result = compress(spec, settings, log=print)
    return {"out": out, **result, "rows": {r["name"]: r for r in result["rows"]}}


def test_every_variant_is_measured_against_the_teacher(run):
    rows = run["rows"]
    assert set(rows) == {"teacher-fp32", "teacher-int8", "r30-none-fp32", "r30-none-int8", "r30-distill-fp32",
                         "r30-distill-int8"}
    teacher = rows["teacher-fp32"]
    assert teacher["map50"] == pytest.approx(1.0)  # the teacher against its own detections
    for name, row in rows.items():
        assert row["error"] is None, name
        assert row["p50_ms"] > 0 and row["teacher_p50_ms"] > 0
        assert row["speedup"] == pytest.approx(row["teacher_p50_ms"] / row["p50_ms"])
        assert 0.0 <= row["map50"] <= 1.0 and 0.0 <= row["map50_95"] <= row["map50"] + 1e-9, name
        if name.startswith("r30"):
            assert row["parameters"] < teacher["parameters"] and row["macs"] < teacher["macs"], name
            assert 0.0 < row["param_reduction"] < 1.0
    assert rows["r30-distill-fp32"]["train"]["steps"] == STEPS
    assert rows["r30-none-fp32"]["train"] is None
    assert rows["r30-distill-fp32"]["train"]["settings"]["mode"] == "distill"


def test_report_has_the_claims_and_the_plot(run):
    paths = run["report"]
    document = json.loads(Path(paths["json"]).read_text())
    assert len(document["claims"]) == 3 and all(c["verdict"] for c in document["claims"])
    md = Path(paths["md"]).read_text()
    assert "## The claims, row by row" in md and "r30-distill-int8" in md
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"
    assert (run["out"] / "checkpoints" / "r30-distill.ckpt").is_file()


def test_the_distilled_int8_student_is_served_over_grpc_and_http(spec, run, tmp_path):
    from builder.optimize import evaluate
    from builder.optimize.evaluate import ImageDetections
    from builder.optimize.pipeline import make_runner
    from builder.optimize.variants import load_variant
    from builder.repository import render_repository, target_for
    from backends.common.files import image_files
    from edgestack.client import DetectionClient
    from edgestack.server import TritonServer
    from tests.integration.conftest import assert_stopped

    variant, _ = load_variant(Path(run["rows"]["r30-distill-int8"]["path"]))
    images = image_files(IMAGES)
    # 3 training steps leave every score under the serving threshold: serve and compare the top candidates
    low = dataclasses.replace(spec.thresholds, score=SCORE)
    served_spec = spec.replace(name="student", thresholds=low)
    offline = evaluate.detect_images(make_runner(variant, spec, 1, 1), spec, images, score_threshold=SCORE)
    repository = tmp_path / "model_repository"
    render_repository(served_spec, repository, target_for(served_spec, detector_instances=1), variant=variant)
    answers = {}
    with TritonServer(repository, log_path=tmp_path / "tritonserver.log") as server:
        pid = server.pid
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with DetectionClient(url, protocol, model="student") as client:
                answers[protocol] = []
                for path, reference in zip(images, offline):
                    result = client.detect(path.read_bytes())
                    assert result.source == "edge" and not result.degraded
                    answers[protocol].append(ImageDetections(
                        [d.box for d in result.detections], [d.score for d in result.detections],
                        [d.class_id for d in result.detections], reference.width, reference.height, path.name))
    assert_stopped(pid)
    assert all(len(d) > 0 for d in offline)
    for protocol in ("grpc", "http"):
        assert [len(d) for d in answers[protocol]] == [len(d) for d in offline]
        agreement = evaluate.fidelity_map(offline, answers[protocol], reference_score_threshold=SCORE)
        print(f"\nserved over {protocol} vs in process: mAP@0.5 {agreement['map50']:.4f} on "
              f"{agreement['gt_boxes']} boxes")
        assert agreement["map50"] >= 0.99
    for over_grpc, over_http in zip(answers["grpc"], answers["http"]):
        np.testing.assert_array_equal(over_http.class_ids, over_grpc.class_ids)
        np.testing.assert_allclose(over_http.scores, over_grpc.scores, atol=1e-6)
        np.testing.assert_allclose(over_http.boxes, over_grpc.boxes, atol=1e-3)
