"""OpenVINO variants against the ONNX Runtime FP32 baseline: detector latency at batch 1, one thread.

One process, same machine, same input (the fixture dog.jpg, preprocessed as the server does), each
runtime pinned to the same thread count; the median of --runs timed runs after a warm-up, the runtimes
measured in turns so drift in the machine's speed hits all of them alike. Builds the IRs into a
temporary folder first (build times printed) and reports, per variant, how far its detections on the
fixture photos are from ONNX Runtime FP32 (mean |score difference| of matched detections, detections
lost). Not a test: it prints numbers.

    .venv/bin/python benchmarks/openvino_speed.py [--runs 30] [--threads 1] [--calibration 5] [--extra]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from backends.detector.onnx_runner import OnnxDetector, make_session  # noqa: E402
from backends.detector.openvino_runner import OpenVinoDetector  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402
from backends.preprocess.image_ops import decode_image, prepare_input  # noqa: E402
from builder.optimize.calibration import load_calibration_set  # noqa: E402
from builder.optimize.openvino_variants import build_openvino, build_openvino_int8  # noqa: E402
from builder.spec import load_spec  # noqa: E402

SPEC = ROOT / "specs" / "centernet_coco.yaml"
IMAGES = ROOT.parent / "shared" / "fixtures" / "images"


def iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detections(run, spec, tensor, transform):
    raw = run(tensor[None])[0]
    return postprocess_image(raw, spec.output.format, transform, num_classes=len(spec.classes),
                             score_threshold=spec.thresholds.score, iou_threshold=spec.thresholds.iou,
                             max_detections=spec.thresholds.max_detections)


def agreement(run, reference_run, spec, inputs) -> tuple[float, int, int]:
    """(mean |score diff| of reference detections found again, reference detections lost, extra detections)."""
    diffs, lost, extra = [], 0, 0
    for tensor, transform in inputs:
        boxes, scores, classes = detections(run, spec, tensor, transform)
        ref_boxes, ref_scores, ref_classes = detections(reference_run, spec, tensor, transform)
        for box, score, cls in zip(ref_boxes, ref_scores, ref_classes):
            found = [j for j in range(len(classes)) if classes[j] == cls and iou(boxes[j], box) > 0.5]
            if found:
                diffs.append(abs(float(scores[found[0]]) - float(score)))
            else:
                lost += 1
        extra += sum(1 for j in range(len(classes))
                     if not any(ref_classes[i] == classes[j] and iou(ref_boxes[i], boxes[j]) > 0.5 for i in range(len(ref_classes))))
    return (float(np.mean(diffs)) if diffs else float("nan")), lost, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=5, help="calibration images (the first N fixture photos by name)")
    parser.add_argument("--extra", action="store_true", help="also ov-fp16 and the faster INT8 recipe with quantized depthwise convolutions")
    args = parser.parse_args()

    spec = load_spec(SPEC)
    image_paths = image_files(IMAGES)
    inputs = [prepare_input(decode_image(p.read_bytes(), spec.limits), spec.input) for p in image_paths]
    tensor = inputs[[p.name for p in image_paths].index("dog.jpg")][0][None]
    calibration = load_calibration_set(IMAGES, spec.input, spec.limits, count=args.calibration)

    with tempfile.TemporaryDirectory(prefix="ov-speed-") as tmp:
        out = Path(tmp)
        builds = {"ov-fp32": lambda: build_openvino(spec.model_path, out / "ov-fp32", "fp32"),
                  "ov-int8": lambda: build_openvino_int8(spec.model_path, out / "ov-int8", calibration)}
        if args.extra:
            builds["ov-fp16"] = lambda: build_openvino(spec.model_path, out / "ov-fp16", "fp16")
            builds["ov-int8-dwint8"] = lambda: build_openvino_int8(spec.model_path, out / "ov-int8-dwint8", calibration,
                                                                   float_depthwise=False, name="ov-int8-dwint8")
        variants, build_s = {}, {}
        for name, build in builds.items():
            started = time.perf_counter()
            variants[name] = build()
            build_s[name] = time.perf_counter() - started

        runners = {"ort-fp32": OnnxDetector(make_session(str(spec.model_path), args.threads), spec.input_name, spec.output.name, 1)}
        for name, variant in variants.items():
            runners[name] = OpenVinoDetector(str(variant.path), spec.input_name, spec.output.name, args.threads)
        for run in runners.values():
            for _ in range(3):
                run.run(tensor)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, runner in runners.items():
                started = time.perf_counter()
                runner.run(tensor)
                times[name].append(time.perf_counter() - started)

        baseline = statistics.median(times["ort-fp32"])
        print(f"# detector latency, batch 1, {args.threads} thread(s), median of {args.runs}; "
              f"{platform.processor() or platform.machine()}, {len(calibration)} calibration images")
        print(f"{'variant':18s} {'median ms':>9s} {'p90 ms':>7s} {'speed-up':>8s} {'build s':>8s} "
              f"{'|d score|':>9s} {'lost':>4s} {'extra':>5s}")
        reference = runners["ort-fp32"].run
        for name, values in times.items():
            median = statistics.median(values)
            p90 = float(np.percentile(values, 90))
            drift, lost, extra = (0.0, 0, 0) if name == "ort-fp32" else agreement(runners[name].run, reference, spec, inputs)
            build = f"{build_s[name]:8.1f}" if name in build_s else f"{'-':>8s}"
            print(f"{name:18s} {median * 1e3:9.1f} {p90 * 1e3:7.1f} {baseline / median:7.2f}x {build} "
                  f"{drift:9.3f} {lost:4d} {extra:5d}")
        print(f"(|d score|, lost, extra: detections on the {len(inputs)} fixture photos against ONNX Runtime FP32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
