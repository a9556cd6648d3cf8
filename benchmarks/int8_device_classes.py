"""INT8 per device class: speed and fidelity of the ORT and OpenVINO INT8 settings on each x86 ISA class.

Builds (natively; a model file does not depend on the host) the INT8 candidates below with the FAST_INT8 recipe /
NNCF, then per class:

  host class      speed: paired rounds in one process (each round runs FP32 and every candidate once, rotating
                  order; speedup = median of the per-round FP32/candidate ratios, as int8_explore.py does);
                  fidelity: mAP@0.5 vs FP32 (evaluate.fidelity_map) of the detections on this machine.
  --emulate CLASS fidelity only, with the detections computed under `qemu-x86_64 -cpu MODEL` (x86-avx2: Haswell,
                  x86-sse: Nehalem); speed under emulation means nothing and is reported as not measurable.

On a real AVX2 machine run it without --emulate: the host class is then x86-avx2 and speed is measured too.

Usage: python benchmarks/int8_device_classes.py [--emulate x86-avx2] [--calibration-count 5] [--eval-count 14]
           [--runs 40] [--only u8s8,rr,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.common.files import image_files  # noqa: E402
from builder.device_class import host_class  # noqa: E402
from builder.optimize import evaluate  # noqa: E402
from builder.optimize import int8_classes  # noqa: E402
from builder.optimize.calibration import load_calibration_set  # noqa: E402
from builder.spec import load_spec  # noqa: E402

QEMU_CPUS = {"x86-avx2": "Haswell", "x86-sse": "Nehalem"}
# name -> (runtime, what, build settings): QuantOptions fields on top of FAST_INT8 / build_openvino_int8 keywords
CANDIDATES = {
    "fp32": ("onnxruntime", "ORT FP32 (baseline)", None),
    "u8s8": ("onnxruntime", "FAST_INT8, full-range U8S8 (the x86-vnni setting)", {}),
    "u8s8-x64prec": ("onnxruntime", "same file, session.x64quantprecision=1 (without VNNI ORT runs it as U8U8; no-op with VNNI)",
                     {"session_config": {"session.x64quantprecision": "1"}}),
    "rr": ("onnxruntime", "FAST_INT8 + reduce_range (7-bit weights)", {"reduce_range": True}),
    "u8u8-pt": ("onnxruntime", "FAST_INT8, uint8 weights per tensor (U8U8)", {"weight_type": "uint8", "per_channel": False}),
    "s8s8": ("onnxruntime", "FAST_INT8, int8 activations (S8S8)", {"activation_type": "int8"}),
    "ov-fp32": ("openvino", "OpenVINO FP32", None),
    "ov-int8": ("openvino", "NNCF default (overflow fix on the first layer only)", {}),
    "ov-int8-of": ("openvino", "NNCF overflow_fix=enable", {"overflow_fix": "enable"}),
}


def build(name: str, spec, calibration, out: Path, rebuild: bool) -> Path:
    """The model file of a candidate, built into out/name (cached)."""
    from builder.optimize import openvino_variants as ovv
    from builder.optimize import ort_variants as ov

    runtime, _, settings = CANDIDATES[name]
    if name == "fp32":
        return spec.model_path
    if name == "u8s8-x64prec":
        return build("u8s8", spec, calibration, out, rebuild)
    target = out / name
    path = target / ("model.xml" if runtime == "openvino" else ov.MODEL_FILE)
    if path.is_file() and not rebuild:
        return path
    started = time.perf_counter()
    if name == "ov-fp32":
        ovv.build_openvino(spec.model_path, target, "fp32")
    elif runtime == "openvino":
        ovv.build_openvino_int8(spec.model_path, target, calibration, **settings)
    else:
        options = ov.QuantOptions(**{**ov.FAST_INT8, **settings}, exclude_nodes=ov.default_head_exclusions(spec.model_path))
        ov.build_int8(spec.model_path, target, calibration, spec.input_name, options)
    print(f"built {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def runner(name: str, path: Path, spec, threads: int):
    runtime, _, settings = CANDIDATES[name]
    if runtime == "openvino":
        from backends.detector.openvino_runner import OpenVinoDetector

        return OpenVinoDetector(str(path), spec.input_name, spec.output.name, threads)
    import onnxruntime as ort

    from backends.detector.onnx_runner import OnnxDetector
    from builder.optimize.ort_common import session_options

    options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)
    for key, value in ((settings or {}).get("session_config") or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OnnxDetector(session, spec.input_name, spec.output.name, 1)


def worker(job: Path) -> int:
    """Detections of every model of the job on every image (run natively or under qemu); JSON on stdout's file."""
    task = json.loads(job.read_text())
    spec = load_spec(task["spec"])
    images = [Path(p) for p in task["images"]]
    result = {"device_class": host_class()}
    for name, path in task["models"].items():
        found = evaluate.detect_images(runner(name, Path(path), spec, 1), spec, images)
        result[name] = [{"boxes": d.boxes.tolist(), "scores": d.scores.tolist(), "class_ids": d.class_ids.tolist(),
                         "width": d.width, "height": d.height, "file_name": d.file_name} for d in found]
        print(f"  {name}: {len(images)} images", file=sys.stderr, flush=True)
    Path(task["out"]).write_text(json.dumps(result))
    return 0


def detections_on(device_class: str | None, models: dict[str, Path], images: list[Path], spec_path: str,
                  work: Path) -> dict:
    """{name: [ImageDetections]} computed natively (device_class None) or under qemu for device_class."""
    work.mkdir(parents=True, exist_ok=True)
    tag = device_class or "host"
    job, out = work / f"job-{tag}.json", work / f"detections-{tag}.json"
    job.write_text(json.dumps({"spec": spec_path, "images": [str(p) for p in images], "out": str(out),
                               "models": {k: str(v) for k, v in models.items()}}))
    command = [sys.executable, __file__, "--worker", str(job)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if device_class is not None:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            raise SystemExit("qemu-x86_64 is not installed (apt-get install qemu-user)")
        command = [qemu, "-cpu", QEMU_CPUS[device_class], *command]
        env["EDGESTACK_DEVICE_CLASS"] = device_class  # qemu-user shows the host's /proc/cpuinfo
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stderr=sys.stderr,
                   stdout=subprocess.DEVNULL if device_class else None)
    print(f"detections on {tag}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    data = json.loads(out.read_text())
    return {k: [evaluate.ImageDetections(**d) for d in v] for k, v in data.items() if k != "device_class"}


def paired_speed(models: dict[str, Path], spec, image: Path, runs: int, threads: int) -> dict[str, float]:
    """Median over rounds of FP32 time / candidate time in the same round (rotating order), batch 1."""
    tensor = evaluate.prepare_image(spec, image)[0][None]
    runners = {name: runner(name, path, spec, threads) for name, path in models.items()}
    names = list(runners)
    for name in names:
        for _ in range(3):
            runners[name].run(tensor)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            started = time.perf_counter()
            runners[name].run(tensor)
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(np.array(times["fp32"]) / np.array(times[name]))) for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "fixtures" / "images"))
    parser.add_argument("--calibration-count", type=int, default=5)
    parser.add_argument("--eval-count", type=int, default=None, help="first N images for fidelity (all)")
    parser.add_argument("--emulate", default="", help=f"comma list of classes to emulate: {', '.join(QEMU_CPUS)}")
    parser.add_argument("--only", default="", help="comma list of candidates (fp32 and ov-fp32 always)")
    parser.add_argument("--runs", type=int, default=40, help="paired timing rounds on the host (0: no timing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "build" / "int8_device_classes"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker))

    spec = load_spec(args.spec)
    names = list(CANDIDATES) if not args.only else ["fp32", "ov-fp32", *args.only.split(",")]
    unknown = set(names) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidate(s) {sorted(unknown)}; known: {list(CANDIDATES)}")
    names = [n for n in CANDIDATES if n in names]
    calibration = load_calibration_set(Path(args.images), spec.input, spec.limits, args.calibration_count)
    images = image_files(Path(args.images))[:args.eval_count]
    out = Path(args.out)
    models = {}
    for name in names:
        try:
            models[name] = build(name, spec, calibration, out, args.rebuild)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is a finding
            print(f"{name}: build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
    host = host_class()
    classes = [None, *[c for c in args.emulate.split(",") if c]]
    results: dict[str, dict] = {}
    for device_class in classes:
        label = device_class or host
        found = detections_on(device_class, models, images, args.spec, out / "runs")
        fidelity = {}
        for name in models:
            reference = found["ov-fp32" if CANDIDATES[name][0] == "openvino" else "fp32"]
            fidelity[name] = evaluate.fidelity_map(reference, found[name],
                                                   reference_score_threshold=spec.thresholds.score)["map50"]
        speed = paired_speed(models, spec, images[len(images) // 2], args.runs, args.threads) if device_class is None and args.runs else {}
        results[label] = {"emulated": device_class is not None, "fidelity": fidelity, "speed": speed}

    print(f"\nhost: {platform.processor() or platform.machine()}, class {host}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s); calibration {len(calibration)} images, fidelity on {len(images)} images "
          f"(mAP@0.5 vs the same runtime's FP32 on the same class)\n")
    print("| class | candidate | runtime | what | speed vs ORT FP32 | fidelity mAP@0.5 | registry pick |")
    print("|---|---|---|---|--:|--:|---|")
    for label, result in results.items():
        pick = int8_classes.settings_for(label)
        for name in models:
            runtime, what, settings = CANDIDATES[name]
            speed = result["speed"].get(name)
            speed_text = ("not measurable here (emulated)" if result["emulated"]
                          else f"{speed:.2f}x" if speed is not None else "-")
            chosen = (runtime == "onnxruntime" and settings is not None and "session_config" not in settings
                      and dict(settings) == dict(pick.ort)) or \
                     (runtime == "openvino" and settings is not None and settings.get("overflow_fix") == pick.openvino_overflow_fix)
            print(f"| {label}{' (emulated)' if result['emulated'] else ''} | {name} | {runtime} | {what} | {speed_text} | "
                  f"{result['fidelity'][name]:.3f} | {'yes' if chosen else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
