"""Ensemble overhead benchmark: the served pipeline over gRPC against the same work in one Python function.

One run, same machine, same images, same ONNX Runtime threads:
  1. latency at concurrency 1: in-process (decode, preprocess, ONNX Runtime, decode + NMS) and the
     ensemble over gRPC, interleaved image by image, medians and p90 and their ratio;
  2. where the ensemble's time goes, from Triton's statistics API (queue and compute per step);
  3. ensemble throughput at a few concurrency levels.
Not a test: it prints numbers (and appends them to a Markdown file with --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from backends.detector.onnx_runner import make_session  # noqa: E402
from backends.postprocess.pipeline import postprocess_image  # noqa: E402
from backends.preprocess.image_ops import decode_image, prepare_input  # noqa: E402
from builder.repository import render_repository, target_for  # noqa: E402
from builder.spec import PipelineSpec, load_spec  # noqa: E402
from edgestack.client import DetectionClient  # noqa: E402
from edgestack.server import TritonServer  # noqa: E402

STEPS = ("preprocess", "detector", "postprocess", "router")


def in_process_detector(spec: PipelineSpec, threads: int):
    session = make_session(str(spec.model_path), intra_op_threads=threads)
    options = dict(num_classes=len(spec.classes), score_threshold=spec.thresholds.score, iou_threshold=spec.thresholds.iou,
                   max_detections=spec.thresholds.max_detections, class_agnostic=spec.thresholds.class_agnostic)

    def detect(data: bytes):
        tensor, transform = prepare_input(decode_image(data, spec.limits), spec.input)
        raw = session.run([spec.output.name], {spec.input_name: tensor[None]})[0]
        return postprocess_image(raw[0], spec.output.format, transform, **options)

    return detect


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def step_breakdown(server: TritonServer, spec: PipelineSpec, before: dict) -> dict[str, dict[str, float]]:
    """Average ms per request of each step over the window since `before` (queue, input, infer, output)."""
    now = model_stats(server, spec)
    out = {}
    for step, stats in now.items():
        prev = before[step]
        count = stats["count"] - prev["count"]
        out[step] = {k: (stats[k] - prev[k]) / 1e6 / max(count, 1) for k in ("queue", "compute_input", "compute_infer", "compute_output")}
        out[step]["requests"] = count
    return out


def model_stats(server: TritonServer, spec: PipelineSpec) -> dict[str, dict[str, int]]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        result = {}
        for step in (*STEPS, None):
            name = f"{spec.name}_{step}" if step else spec.name
            s = client.get_inference_statistics(name, as_json=True)["model_stats"][0]["inference_stats"]
            result[step or "ensemble"] = {
                "count": int(s["success"].get("count", 0)),
                **{k: int(s[k].get("ns", 0)) for k in ("queue", "compute_input", "compute_infer", "compute_output")},
            }
        return result
    finally:
        client.close()


def throughput(url: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[float, float]:
    """Images per second and p99 latency (ms) with `concurrency` clients sending back to back."""
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with DetectionClient(url, "grpc") as client:
            i = offset
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                client.detect(images[i % len(images)])
                with lock:
                    latencies.append(time.perf_counter() - started)
                i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - began), percentile(latencies, 99) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"))
    parser.add_argument("--rounds", type=int, default=5, help="passes over the images for the latency comparison")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput level")
    parser.add_argument("--out", help="append the results as a Markdown section to this file")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    images = [p.read_bytes() for p in image_files(Path(args.images))]
    detect_local = in_process_detector(spec, args.threads)
    lines = [f"## Ensemble overhead ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, {len(images)} images)",
             "", f"Latency at concurrency 1: one detector instance with {args.threads} ONNX Runtime thread(s) on both sides.", ""]

    with tempfile.TemporaryDirectory() as tmp:
        target = target_for(spec, intra_op_threads=args.threads, detector_instances=1)
        repo = render_repository(spec, Path(tmp) / "repo", target)
        with TritonServer(repo, log_path=Path(tmp) / "triton.log") as server, DetectionClient(server.grpc_url, "grpc", spec.name) as client:
            for data in images:  # warm both paths
                detect_local(data)
                client.detect(data)
            local, served = [], []
            before = model_stats(server, spec)
            for _ in range(args.rounds):
                for data in images:
                    t0 = time.perf_counter()
                    detect_local(data)
                    t1 = time.perf_counter()
                    client.detect(data)
                    t2 = time.perf_counter()
                    local.append((t1 - t0) * 1000)
                    served.append((t2 - t1) * 1000)
            breakdown = step_breakdown(server, spec, before)
        # Throughput with the target's own serving profile (instances, threads), on a fresh server.
        serving = target_for(spec)
        repo = render_repository(spec, Path(tmp) / "repo_serving", serving)
        with TritonServer(repo, log_path=Path(tmp) / "triton_serving.log") as server:
            levels = [int(c) for c in args.concurrency.split(",")]
            throughput(server.grpc_url, images, 1, 1.0)  # warm-up
            rates = {c: throughput(server.grpc_url, images, c, args.seconds) for c in levels}

    ratio = statistics.median(served) / statistics.median(local)
    lines += [
        "| path (concurrency 1) | median ms | p90 ms |",
        "|---|---|---|",
        f"| in-process function | {statistics.median(local):.1f} | {percentile(local, 90):.1f} |",
        f"| ensemble over gRPC | {statistics.median(served):.1f} | {percentile(served, 90):.1f} |",
        "",
        f"**median ratio ensemble / in-process: {ratio:.3f}x** (target <= 1.10x)",
        "",
        "Where the ensemble's time goes (Triton statistics, ms per request):",
        "",
        "| step | queue | compute input | compute infer | compute output |",
        "|---|---|---|---|---|",
    ]
    for step, s in breakdown.items():
        lines.append(f"| {step} | {s['queue']:.2f} | {s['compute_input']:.2f} | {s['compute_infer']:.2f} | {s['compute_output']:.2f} |")
    lines += ["", f"Ensemble throughput over gRPC, target `{serving.name}` as served by default "
              f"({serving.detector_instances} detector instance(s) x {serving.intra_op_threads} thread(s)):", "",
              "| concurrency | images/s | p99 ms |", "|---|---|---|"]
    lines += [f"| {c} | {rate:.1f} | {p99:.1f} |" for c, (rate, p99) in rates.items()]
    lines += ["", f"Command: `{' '.join(['python', 'benchmarks/ensemble_overhead.py', *sys.argv[1:]])}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
