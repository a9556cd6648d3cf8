"""ONNX Runtime's spinning intra-op threads against not spinning, on a quiet machine and with a core kept busy.

P processes each run a T-thread session of the fixture detector back to back for S seconds (batch 1), with
`session.intra_op.allow_spinning` 1 (ONNX Runtime's default) and 0 (backends/detector/onnx_runner.py's default).
"Busy" keeps one core busy with a pure-Python loop meanwhile, as preprocess, postprocess or another instance
would. Throughput is images per second over all processes; latency the median per process.

    python benchmarks/ort_spinning.py [--seconds 6] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sections import replace_section  # noqa: E402

MODEL = ROOT.parent / "shared" / "fixtures" / "models" / "centernet_mb3_coco.onnx"
INPUT = "tower_0/images:0"
BEGIN, END = "<!-- ort-spinning:begin -->", "<!-- ort-spinning:end -->"
LAYOUTS = ((1, 1), (1, 2), (2, 1), (2, 2))  # (processes, threads each)


def _run(threads: int, spinning: bool, seconds: float, queue) -> None:
    from backends.detector.onnx_runner import make_session

    session = make_session(str(MODEL), threads, spinning=spinning)
    x = np.random.default_rng(0).random((1, 512, 512, 3), dtype=np.float32) * 255
    for _ in range(3):
        session.run(None, {INPUT: x})
    latencies, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        session.run(None, {INPUT: x})
        latencies.append(time.perf_counter() - started)
    queue.put((len(latencies), float(np.median(latencies)) * 1000))


def _busy(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def measure(processes: int, threads: int, spinning: bool, seconds: float, busy: bool) -> dict:
    queue, stop = mp.Queue(), mp.Event()
    hog = mp.Process(target=_busy, args=(stop,)) if busy else None
    if hog:
        hog.start()
    workers = [mp.Process(target=_run, args=(threads, spinning, seconds, queue)) for _ in range(processes)]
    try:
        for w in workers:
            w.start()
        results = [queue.get(timeout=seconds + 120) for _ in workers]
        for w in workers:
            w.join()
    finally:
        stop.set()
        if hog:
            hog.join()
    return {"images_per_s": sum(n for n, _ in results) / seconds, "p50_ms": float(np.mean([p for _, p in results]))}


def section(rows: list[dict], seconds: float) -> str:
    lines = [f"## ONNX Runtime spinning threads ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores, `python benchmarks/ort_spinning.py`)", "",
             f"P processes x T intra-op threads, each running the fixture detector back to back for {seconds:g} s "
             "(batch 1); \"busy\": one core kept busy meanwhile by a Python loop, as preprocess, postprocess or another "
             "instance keeps it on a device.", "",
             "| load | processes x threads | spinning img/s | spinning p50 ms | not spinning img/s | not spinning p50 ms "
             "| not / spinning |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['load']} | {r['processes']} x {r['threads']} | {r['spin']['images_per_s']:.1f} | "
                     f"{r['spin']['p50_ms']:.1f} | {r['nospin']['images_per_s']:.1f} | {r['nospin']['p50_ms']:.1f} | "
                     f"{r['nospin']['images_per_s'] / r['spin']['images_per_s']:.2f}x |")
    lines += ["", "Reading it: with a thread per core and nothing else running, spinning costs little; once another "
              "process wants a core, spinning threads burn it waiting for each other and lose throughput. The "
              "detector in Triton always shares its cores with the Python-backend preprocess and postprocess, so "
              "`make_session` turns spinning off (`intra_op_spinning`, a target and detector setting)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="write the section here ('' to skip)")
    args = parser.parse_args()
    rows = []
    for busy in (False, True):
        for processes, threads in LAYOUTS:
            row = {"load": "busy core" if busy else "quiet", "processes": processes, "threads": threads}
            for key, spinning in (("spin", True), ("nospin", False)):
                row[key] = measure(processes, threads, spinning, args.seconds, busy)
            print(row, flush=True)
            rows.append(row)
    text = section(rows, args.seconds)
    print(text)
    if args.out:
        replace_section(Path(args.out), BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
