"""How steady is this machine? The detector alone, back to back, in short windows: the spread of the windows is the
floor under any comparison of servers on it.

One process, no server: the fixture detector (the spec's FP32 ONNX file) run by OpenVINO (as the `intel` target) and
by ONNX Runtime (as `cpu`), batch 1, --threads threads, on one preprocessed fixture photo, for --seconds; each
--window's mean latency is printed, then per runtime the fastest and slowest window, their ratio and the share of
windows more than 15% slower than the fastest. Not a test: it prints numbers.

    .venv/bin/python benchmarks/machine_modes.py [--seconds 30] [--window 2] [--threads 2] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from backends.detector.onnx_runner import OnnxDetector, make_session  # noqa: E402
from backends.detector.openvino_runner import OpenVinoDetector  # noqa: E402
from backends.preprocess.image_ops import decode_image, prepare_input  # noqa: E402
from benchmarks.sections import replace_section  # noqa: E402
from builder.device_class import host_class  # noqa: E402
from builder.spec import load_spec  # noqa: E402

SPEC = ROOT / "specs" / "centernet_coco.yaml"
IMAGES = ROOT.parent / "shared" / "fixtures" / "images"
SLOW = 1.15  # a window this much slower than the fastest counts as slow


def windows(run, seconds: float, window: float) -> list[float]:
    """Mean latency (ms) of each window of back-to-back runs."""
    for _ in range(5):
        run()
    means, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < window:
            run()
            n += 1
        means.append(1000 * (time.perf_counter() - start) / n)
    return means


def summary(means: list[float]) -> tuple[float, float, float, float]:
    fastest, slowest = min(means), max(means)
    return fastest, slowest, slowest / fastest, sum(m > SLOW * fastest for m in means) / len(means)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the table as this benchmark's section of this Markdown file")
    args = parser.parse_args()

    spec = load_spec(SPEC)
    tensor, _ = prepare_input(decode_image(image_files(IMAGES)[0].read_bytes(), spec.limits), spec.input)
    batch = tensor[None]
    runners = {"openvino": OpenVinoDetector(str(spec.model_path), spec.input_name, spec.output.name, args.threads),
               "onnxruntime": OnnxDetector(make_session(str(spec.model_path), args.threads), spec.input_name,
                                           spec.output.name, 1)}
    rows = []
    for name, runner in runners.items():
        means = windows(lambda r=runner: r.run(batch), args.seconds, args.window)
        print(f"{name}: " + " ".join(f"{m:.1f}" for m in means) + " ms", flush=True)
        rows.append((name, means, *summary(means)))

    lines = [
        f"## Machine modes: the detector alone in {args.window:g} s windows ({datetime.date.today()}, "
        f"{host_class()}, {platform.machine()}, {args.threads} threads, `python benchmarks/machine_modes.py`)",
        "",
        "| runtime | windows | fastest ms | slowest ms | slowest / fastest | windows > 1.15x the fastest | window means ms |",
        "|---|---|---|---|---|---|---|",
        *(f"| {name} | {len(means)} | {lo:.1f} | {hi:.1f} | {ratio:.2f}x | {share:.0%} | "
          + " ".join(f"{m:.0f}" for m in means) + " |" for name, means, lo, hi, ratio, share in rows),
        "",
        f"Command: `python benchmarks/machine_modes.py --seconds {args.seconds:g} --window {args.window:g} "
        f"--threads {args.threads}`",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        replace_section(Path(args.out), "<!-- machine-modes:begin -->", "<!-- machine-modes:end -->", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
