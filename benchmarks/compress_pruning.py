"""What structured pruning alone buys the fixture detector: size, MACs and FP32 speed per ratio, before fine-tuning.

For each pruning ratio x importance x round_to: builder.compress prunes the trainable copy (bias compensation on 3
unlabelled photos), exports and stitches it (the served interface), and ONNX Runtime (1 thread, ORT_ENABLE_ALL,
batch 1) runs the teacher and every student in paired rounds in one process (each round runs the teacher and each
student once, in rotating order; speedup = median of the per-round teacher/student ratios, as int8_explore.py does),
so the numbers compare under the same load. Also reported: the PyTorch copy's equality with ONNX Runtime, and the
heads' correlation with the teacher's (pruned without fine-tuning: what distillation starts from).

Usage: python benchmarks/compress_pruning.py [--ratios 0.3,0.5,0.7] [--importances magnitude,bn-scale]
           [--round-to none,16] [--runs 30] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.compress import export as ex  # noqa: E402
from builder.compress import prune as pr  # noqa: E402
from builder.compress import set_torch_threads  # noqa: E402
from builder.compress import torch_copy as tc  # noqa: E402
from builder.device_class import host_class  # noqa: E402
from builder.optimize.evaluate import prepare_image  # noqa: E402
from builder.spec import load_spec  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
BEGIN, END = "<!-- compress-pruning:begin -->", "<!-- compress-pruning:end -->"


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_speedups(teacher: Path, students: dict[str, Path], feed: dict, runs: int) -> tuple[float, dict]:
    sessions = {"teacher": session(teacher), **{k: session(v) for k, v in students.items()}}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    names = list(sessions)
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            started = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - started)
    teacher_ms = float(np.median(times["teacher"]) * 1000)
    result = {}
    for name in students:
        ratios = np.array(times["teacher"]) / np.array(times[name])
        result[name] = {"p50_ms": float(np.median(times[name]) * 1000), "speedup": float(np.median(ratios))}
    return teacher_ms, result


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--importances", default="magnitude,bn-scale")
    parser.add_argument("--round-to", default="none,16")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write the section into this Markdown file (between markers)")
    args = parser.parse_args()
    set_torch_threads(1)
    spec = load_spec(ROOT / "specs" / "centernet_coco.yaml")
    unlabelled = np.stack([prepare_image(spec, p)[0] for p in sorted((FIXTURES / "images_more").iterdir())[:3]])
    photos = np.stack([prepare_image(spec, FIXTURES / "images" / n)[0] for n in ("dog.jpg", "horses.jpg")])
    work = Path(tempfile.mkdtemp(prefix="compress_pruning_"))
    copy = tc.to_torch(spec.model_path, work, threads=1)
    equality = tc.check_equality(copy, photos)
    teacher_heads = tc.reference_heads(copy.cut, photos)
    rows, students = [], {}
    for importance in args.importances.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            for round_to in args.round_to.split(","):
                settings = pr.PruneSettings(ratio, importance, None if round_to == "none" else int(round_to))
                started = time.perf_counter()
                result = pr.prune(copy, settings, unlabelled)
                seconds = time.perf_counter() - started
                name = f"{settings.name}-r{round_to}"
                path, _ = ex.export_student(result.copy, work / f"{name}.onnx", photos[:1])
                heads = tc.torch_heads(result.copy, photos)
                students[name] = path
                rows.append({**result.to_dict(), "name": name, "round_to": round_to, "prune_s": seconds, "bytes": path.stat().st_size,
                             "corr_heatmap": correlation(teacher_heads["heatmap_logits"], heads["heatmap_logits"]),
                             "corr_wh": correlation(teacher_heads["wh"], heads["wh"])})
                print(f"{name}: pruned in {seconds:.1f} s, {result.params_after:,} parameters", flush=True)
    feed = {spec.input_name: photos[:1]}
    teacher_ms, speed = paired_speedups(spec.model_path, students, feed, args.runs)
    date = time.strftime("%Y-%m-%d")
    lines = [BEGIN, f"## Structured pruning before fine-tuning ({date}, {host_class()}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared, "
             f"`python benchmarks/compress_pruning.py --runs {args.runs}`)", "",
             "builder.compress on the fixture detector: the PyTorch copy vs ONNX Runtime, max abs difference "
             f"heatmap logits {equality.max_abs_diff['heatmap_logits']:.1e}, size map "
             f"{equality.max_abs_diff['wh']:.1e} px (of {equality.reference_max_abs['wh']:.0f}). Each student pruned "
             "(bias compensation on 3 unlabelled photos), exported with the decode tail and run by ONNX Runtime "
             f"FP32, 1 thread, paired rounds against the teacher ({teacher_ms:.1f} ms here). Correlation: of the "
             "heads with the teacher's on 2 photos, without fine-tuning.", "",
             "| student | channels removed | params | MACs | file | p50 ms | speedup vs teacher | corr heatmap | "
             "corr size |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = speed[row["name"]]
        lines.append(f"| {row['name']} | {row['prunable_channels_removed']:.0%} | {row['params_after'] / 1e6:.2f} M "
                     f"(-{row['params_reduction']:.0%}) | {row['macs_after'] / 1e9:.2f} G (-{row['macs_reduction']:.0%})"
                     f" | {row['bytes'] / 1e6:.1f} MB | {s['p50_ms']:.1f} | {s['speedup']:.2f}x | "
                     f"{row['corr_heatmap']:.2f} | {row['corr_wh']:.2f} |")
    lines += ["", f"Teacher: {rows[0]['params_before'] / 1e6:.2f} M parameters, {rows[0]['macs_before'] / 1e9:.2f} G "
              f"MACs, {spec.model_path.stat().st_size / 1e6:.1f} MB.", END]
    section = "\n".join(lines)
    print(section)
    if args.out:
        text = args.out.read_text() if args.out.exists() else ""
        if BEGIN in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
