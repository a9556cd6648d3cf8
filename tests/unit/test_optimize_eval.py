"""builder.optimize.{evaluate,select,manifest,report}: fidelity mAP, labelled mAP, selection, manifest, report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from backends.detector.onnx_runner import OnnxDetector, make_session
from builder.optimize.evaluate import (
    ImageDetections,
    detect_images,
    fidelity_map,
    labelled_map,
    measure_latency,
    measure_throughput,
)
from builder.optimize.variant_stats import file_stats, quantized_op_counts
from builder.optimize.manifest import build_manifest, manifest_sha256, write_manifest
from builder.optimize.report import variant_row, write_report
from builder.optimize.select import refusals, select_variant
from builder.optimize.variants import Variant
from builder.spec import load_spec
from tests.conftest import MODEL, SPEC

THRESHOLD = 0.35


def dets(boxes, scores, classes, width=640, height=480, name="") -> ImageDetections:
    return ImageDetections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                           np.array(classes, np.int32), width, height, name)


@pytest.fixture
def reference() -> list[ImageDetections]:
    """Three images, several classes, well separated boxes, some below the threshold, one image without GT."""
    return [
        dets([[10, 10, 110, 90], [200, 50, 300, 200], [400, 300, 500, 420], [50, 300, 120, 380]],
             [0.9, 0.8, 0.6, 0.2], [0, 1, 2, 0]),
        dets([[30, 40, 230, 240], [300, 300, 380, 460], [500, 20, 600, 100]], [0.7, 0.5, 0.4], [0, 3, 1]),
        dets([[100, 100, 150, 150]], [0.1], [2]),  # nothing above the threshold: no ground truth here
    ]


def shifted(images: list[ImageDetections], fraction: float) -> list[ImageDetections]:
    out = []
    for d in images:
        widths = d.boxes[:, 2] - d.boxes[:, 0]
        boxes = d.boxes.copy()
        boxes[:, 0] += widths * fraction
        boxes[:, 2] += widths * fraction
        out.append(ImageDetections(boxes, d.scores, d.class_ids, d.width, d.height))
    return out


# --- fidelity_map -------------------------------------------------------------------------------


def test_fidelity_against_itself_is_one(reference):
    result = fidelity_map(reference, reference, reference_score_threshold=THRESHOLD)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(1.0)
    assert result["gt_boxes"] == 6
    assert result["images"] == 3
    assert result["note"] is None


def test_fidelity_of_boxes_shifted_by_half_their_width_is_much_lower(reference):
    result = fidelity_map(reference, shifted(reference, 0.5), reference_score_threshold=THRESHOLD)
    # IoU of a box and itself shifted by half its width is 1/3: no match even at 0.5
    assert result["map50"] < 0.2
    assert result["map50_95"] < 0.2


def test_fidelity_small_shift_keeps_map50_but_lowers_strict_map(reference):
    result = fidelity_map(reference, shifted(reference, 0.1), reference_score_threshold=THRESHOLD)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] < 0.9


def test_fidelity_with_one_missing_detection_is_between_zero_and_one(reference):
    candidate = list(reference)
    first = reference[0]
    candidate[0] = ImageDetections(first.boxes[1:], first.scores[1:], first.class_ids[1:], first.width, first.height)
    result = fidelity_map(reference, candidate, reference_score_threshold=THRESHOLD)
    assert 0.0 < result["map50"] < 1.0
    assert 0.0 < result["map50_95"] < 1.0


def test_fidelity_class_mismatch_lowers_it(reference):
    candidate = list(reference)
    first = reference[0]
    wrong = first.class_ids.copy()
    wrong[0] = 5  # a person called something else
    candidate[0] = ImageDetections(first.boxes, first.scores, wrong, first.width, first.height)
    result = fidelity_map(reference, candidate, reference_score_threshold=THRESHOLD)
    assert result["map50"] < 1.0
    # class 5 has no ground truth: COCOeval ignores that category instead of scoring it 0
    assert result["categories"] == 4


def test_fidelity_extra_false_positive_in_image_without_ground_truth_lowers_it(reference):
    candidate = list(reference)
    candidate[2] = dets([[100, 100, 150, 150]], [0.95], [0])  # class 0 has GT elsewhere: a ranked-first FP
    result = fidelity_map(reference, candidate, reference_score_threshold=THRESHOLD)
    assert result["map50"] < 1.0


def test_fidelity_without_any_ground_truth_is_nan_with_a_note(reference):
    result = fidelity_map(reference, reference, reference_score_threshold=0.99)
    assert math.isnan(result["map50"]) and math.isnan(result["map50_95"])
    assert "no ground-truth" in result["note"]


def test_fidelity_of_an_empty_candidate_is_zero(reference):
    empty = [dets([], [], [], d.width, d.height) for d in reference]
    result = fidelity_map(reference, empty, reference_score_threshold=THRESHOLD)
    assert result["map50"] == 0.0 and result["map50_95"] == 0.0


def test_fidelity_rejects_misaligned_lists(reference):
    with pytest.raises(ValueError):
        fidelity_map(reference, reference[:2], reference_score_threshold=THRESHOLD)


# --- labelled_map -------------------------------------------------------------------------------


@pytest.fixture
def labels(tmp_path) -> Path:
    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 9, "file_name": "sub/b.jpg", "width": 640, "height": 480},
                   {"id": 11, "file_name": "not_evaluated.jpg", "width": 640, "height": 480}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 10, 100, 80], "area": 8000, "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [30, 40, 200, 200], "area": 40000, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    return path


CLASS_NAMES = ("person", "bicycle", "dog")


def test_labelled_map_matches_images_by_file_name_and_classes_by_name(labels):
    candidate = [dets([[10, 10, 110, 90]], [0.9], [2]), dets([[30, 40, 230, 240]], [0.8], [0])]
    result = labelled_map(labels, candidate, ["a.jpg", "b.jpg"], CLASS_NAMES)
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx(1.0)
    assert result["images"] == 2  # not_evaluated.jpg is not among the candidate's images
    assert result["unmatched_classes"] == ["bicycle"]


def test_labelled_map_wrong_class_and_unknown_images(labels):
    candidate = [dets([[10, 10, 110, 90]], [0.9], [0]), dets([[30, 40, 230, 240]], [0.8], [0]),
                 dets([[1, 1, 20, 20]], [0.5], [1])]
    result = labelled_map(labels, candidate, ["a.jpg", "b.jpg", "c.jpg"], CLASS_NAMES)
    # dog: never found, AP 0; person: the dog called a person outranks the real one, AP 0.5
    assert result["map50"] == pytest.approx(0.25)
    assert result["unmatched_images"] == ["c.jpg"]
    assert result["dropped_detections"] == 1


# --- select_variant -----------------------------------------------------------------------------


ROWS = [
    {"name": "fp32", "p50_ms": 30.0, "map50": 1.0, "file_bytes": 8_000_000},
    {"name": "int8-entropy-pc", "p50_ms": 18.2, "map50": 0.97, "file_bytes": 2_200_000},
    {"name": "ov-int8", "p50_ms": 15.0, "map50": 0.91, "file_bytes": 2_100_000},
    {"name": "ov-fp32", "p50_ms": 24.0, "map50": 0.999, "file_bytes": 8_100_000},
]


def test_select_budget_only_picks_the_fastest():
    row, reason = select_variant(ROWS, latency_budget_ms=25, accuracy_floor=None)
    assert row["name"] == "ov-int8"
    assert "rejected fp32: p50 30.0 ms > 25 ms budget" in reason


def test_select_floor_only_picks_the_fastest_accurate_enough():
    row, reason = select_variant(ROWS, latency_budget_ms=None, accuracy_floor=0.95)
    assert row["name"] == "int8-entropy-pc"
    assert "rejected ov-int8: mAP@0.5 0.91 < 0.95 floor" in reason


def test_select_budget_and_floor():
    row, reason = select_variant(ROWS, latency_budget_ms=25, accuracy_floor=0.95)
    assert row["name"] == "int8-entropy-pc"
    assert reason.startswith("picked int8-entropy-pc: p50 18.2 ms <= 25 ms budget, mAP@0.5 0.97 >= 0.95 floor")
    assert "faster than ov-fp32 (24.0 ms)" in reason
    assert "rejected fp32" in reason and "rejected ov-int8" in reason


def test_select_nothing_qualifies():
    row, reason = select_variant(ROWS, latency_budget_ms=10, accuracy_floor=0.99)
    assert row is None
    assert reason.startswith("no variant meets the 10 ms budget and the mAP@0.5 0.99 floor")
    for r in ROWS:
        assert f"rejected {r['name']}" in reason


def test_select_ties_go_to_accuracy_then_size():
    rows = [
        {"name": "a", "p50_ms": 10.0, "map50": 0.96, "file_bytes": 100},
        {"name": "b", "p50_ms": 10.0, "map50": 0.98, "file_bytes": 300},
        {"name": "c", "p50_ms": 10.0, "map50": 0.98, "file_bytes": 200},
    ]
    row, reason = select_variant(rows, latency_budget_ms=None, accuracy_floor=None)
    assert row["name"] == "c"
    assert "smaller file" in reason and "higher mAP@0.5" in reason


def test_select_latency_tolerance_makes_near_ties():
    rows = [{"name": "fast", "p50_ms": 10.0, "map50": 0.95}, {"name": "accurate", "p50_ms": 10.3, "map50": 0.99}]
    assert select_variant(rows, latency_budget_ms=None, accuracy_floor=None)[0]["name"] == "fast"
    picked, _ = select_variant(rows, latency_budget_ms=None, accuracy_floor=None, latency_tolerance_ms=0.5)
    assert picked["name"] == "accurate"


def test_select_skips_failed_and_unmeasured_rows():
    rows = [{"name": "broken", "error": "cannot load", "p50_ms": None, "map50": None},
            {"name": "nan", "p50_ms": 5.0, "map50": float("nan")},
            {"name": "ok", "p50_ms": 9.0, "map50": 0.97}]
    row, reason = select_variant(rows, latency_budget_ms=None, accuracy_floor=0.9)
    assert row["name"] == "ok"
    assert "rejected broken: failed (cannot load)" in reason
    assert "rejected nan: no mAP@0.5 measured" in reason


def test_refusals_name_each_refused_row_and_its_reasons():
    refused = refusals(ROWS, latency_budget_ms=20, accuracy_floor=0.95)
    assert refused == {"fp32": "p50 30.0 ms > 20 ms budget", "ov-int8": "mAP@0.5 0.91 < 0.95 floor",
                       "ov-fp32": "p50 24.0 ms > 20 ms budget"}
    assert refusals(ROWS, latency_budget_ms=None, accuracy_floor=None) == {}
    assert select_variant(ROWS, latency_budget_ms=20, accuracy_floor=0.95)[0]["name"] == "int8-entropy-pc"


# --- fixture model: detect_images, file_stats, speed --------------------------------------------


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def detector(spec):
    return OnnxDetector(make_session(str(MODEL), intra_op_threads=1), spec.input_name, spec.output.name, fixed_batch=1)


def test_detect_images_finds_dog_bicycle_car(spec, detector, fixture_images):
    [result] = detect_images(detector, spec, [fixture_images / "dog.jpg"])
    assert (result.width, result.height) == (768, 576)
    served = result.above(spec.thresholds.score)
    assert {spec.classes[c] for c in served.class_ids} == {"dog", "bicycle", "car"}
    assert len(result) > len(served)  # the low-score tail is kept for mAP
    assert result.scores.min() >= 0.05
    assert (result.boxes[:, 2] <= result.width).all() and (result.boxes[:, 3] <= result.height).all()
    # the FP32 model against itself
    assert fidelity_map([result], [result], reference_score_threshold=spec.thresholds.score)["map50"] == pytest.approx(1.0)


def test_file_stats_on_the_fixture_onnx():
    stats = file_stats(Variant("fp32", "onnxruntime", "fp32", MODEL))
    assert stats["file_bytes"] == MODEL.stat().st_size
    assert stats["parameters"] > 1_000_000
    assert 0.9 * stats["file_bytes"] < stats["weight_bytes"] <= stats["file_bytes"]
    assert quantized_op_counts(Variant("fp32", "onnxruntime", "fp32", MODEL)) == {}


def test_file_stats_openvino_ir(tmp_path):
    xml = tmp_path / "model.xml"
    xml.write_text('<net><layers><layer id="0" type="Const"><data element_type="i8" shape="16,3,3,3" offset="0" size="432"/></layer>'
                   '<layer id="1" type="FakeQuantize"/><layer id="2" type="Const"><data element_type="f32" shape="" size="4"/></layer>'
                   "</layers></net>")
    (tmp_path / "model.bin").write_bytes(b"\0" * 436)
    variant = Variant("ov-int8", "openvino", "int8", xml)
    stats = file_stats(variant)
    assert stats["weight_bytes"] == 436
    assert stats["parameters"] == 16 * 27 + 1
    assert stats["file_bytes"] == 436 + xml.stat().st_size
    assert quantized_op_counts(variant) == {"FakeQuantize": 1}


class FakeRunner:
    def __init__(self, fixed_batch=None):
        self.fixed_batch = fixed_batch
        self.sizes: list[int] = []

    def run_outputs(self, batch):
        self.sizes.append(len(batch))
        if len(batch) > 4:
            raise RuntimeError("out of memory")
        return [np.zeros((len(batch), 1, 6), np.float32)]


def test_measure_latency_and_throughput_with_a_fake_runner():
    tensors = [np.zeros((8, 8, 3), np.float32), np.zeros((1, 8, 8, 3), np.float32)]
    runner = FakeRunner()
    latency = measure_latency(runner, tensors, runs=20, warmup=3)
    assert runner.sizes == [1] * 23
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"]
    result = measure_throughput(runner, tensors, (1, 2, 8), seconds=0.02)
    assert set(result["per_batch"]) == {1, 2} and 8 in result["failed"]
    assert result["best_batch"] in (1, 2) and result["images_per_s"] > 0


def test_measure_throughput_fixed_batch_one_measures_only_batch_one(detector):
    tensors = [np.zeros((8, 8, 3), np.float32)]
    result = measure_throughput(FakeRunner(fixed_batch=1), tensors, (1, 2, 4), seconds=0.02)
    assert list(result["per_batch"]) == [1] and result["best_batch"] == 1
    assert "fixed at batch 1" in result["note"]
    # the ORT detector on the fixture graph says so itself
    from builder.optimize.evaluate import runner_fixed_batch
    assert runner_fixed_batch(detector) == 1


# --- manifest -----------------------------------------------------------------------------------


def test_manifest_is_reproducible_and_lists_file_hashes(tmp_path, spec):
    import hashlib

    folder = tmp_path / "ov"
    folder.mkdir()
    (folder / "model.xml").write_text("<net/>")
    (folder / "model.bin").write_bytes(b"weights")
    variant = Variant("ov-int8", "openvino", "int8", folder / "model.xml", {"preset": "mixed", "subset": 2})
    source = tmp_path / "source.onnx"
    source.write_bytes(b"onnx bytes")
    kwargs = dict(source_model=source, spec=spec, calibration_sha256="ab" * 32, metrics={"map50": 0.97, "x": float("nan")})
    first, second = build_manifest(variant, **kwargs), build_manifest(variant, **kwargs)
    assert first == second
    assert first["files"]["model.bin"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert set(first["files"]) == {"model.xml", "model.bin"}
    assert first["source_model"]["sha256"] == hashlib.sha256(b"onnx bytes").hexdigest()
    assert first["calibration_sha256"] == "ab" * 32
    assert first["options"] == {"preset": "mixed", "subset": 2}
    assert first["spec"]["input_name"] == spec.input_name
    assert {"numpy", "python", "platform", "onnx"} <= set(first["tools"])
    assert first["metrics"]["x"] is None
    assert manifest_sha256(first) == first["manifest_sha256"]
    path_a = write_manifest(first, tmp_path / "a")
    path_b = write_manifest(second, tmp_path / "b")
    assert path_a.name == "manifest.json"
    assert path_a.read_bytes() == path_b.read_bytes()
    (folder / "model.bin").write_bytes(b"other weights")
    assert build_manifest(variant, **kwargs)["manifest_sha256"] != first["manifest_sha256"]


# --- report -------------------------------------------------------------------------------------


def test_report_writes_json_markdown_and_png(tmp_path):
    variant = Variant("int8-entropy-pc", "onnxruntime", "int8", MODEL)
    rows = [dict(r, runtime="onnxruntime", precision="int8", p99_ms=r["p50_ms"] * 1.5, images_per_s=40.0, best_batch=1)
            for r in ROWS]
    rows[1] = variant_row(variant, stats={"file_bytes": 2_200_000, "weight_bytes": 2_000_000, "parameters": 2_015_012},
                          latency={"p50_ms": 18.2, "p99_ms": 25.0}, throughput={"images_per_s": 55.0, "best_batch": 1},
                          fidelity={"map50": 0.97, "map50_95": 0.88}, labelled={"map50": 0.5, "map50_95": 0.3},
                          quantized_ops={"QuantizeLinear": 40, "DequantizeLinear": 120})
    rows.append({"name": "trt-fp16", "runtime": "tensorrt", "precision": "fp16", "error": "no GPU here"})
    selection = select_variant(rows, latency_budget_ms=25, accuracy_floor=0.95)
    paths = write_report(rows, tmp_path / "report", selection=selection,
                         context={"machine": "2-core CPU", "intra_op_threads": 1, "images": 14,
                                  "latency_budget_ms": 25, "accuracy_floor": 0.95})
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "accuracy_vs_latency.png"}
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["variants"]] == [r["name"] for r in rows]
    assert data["selection"]["name"] == "int8-entropy-pc"
    md = paths["md"].read_text()
    for r in rows:
        assert r["name"] in md
    assert "QuantizeLinear 40" in md and "labelled mAP@0.5" in md and "no GPU here" in md
    assert selection[1] in md and "2-core CPU" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_selection_or_measurements(tmp_path):
    paths = write_report([{"name": "only"}], tmp_path, selection=None, context={})
    assert "only" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
