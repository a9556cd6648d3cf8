"""GPU check: every GPU path of the project run on a lent NVIDIA machine, GPU against CPU per step, in one command.

    scripts/gpu_check.sh            (installs CuPy and TensorRT from the package registry, then runs this)
    python benchmarks/gpu_check.py --out build/gpu_check

Steps (each recorded, none stops the others; a step past the time budget is skipped and says so):
  environment   nvidia-smi's GPU and driver, CuPy's devices, TensorRT's version, the tritonserver backends
  preprocess    tests/unit/test_preprocess_gpu.py (CuPy against the CPU path on real photos), then
                prepare_input (NumPy) vs prepare_input_gpu (CuPy) per fixture photo, median ms
  nms           the detector's raw candidates on every fixture photo: class-aware greedy NMS with the IoU matrix
                on the GPU (nms_on_device, CuPy) must keep exactly what backends.postprocess.nms.batched_nms keeps
  trt-fp16/int8 TensorRT plans built with builder.optimize.tensorrt_variants (INT8: entropy calibration on the
                fixture photos), then run with TensorRT's runtime vs ONNX Runtime FP32 on the CPU (threads given)
  serve         the `nvidia-gpu` target (the FP16 plan as a variant) and the `cpu` target, each served by
                tritonserver, `edgestack bench`'s per-step budget side by side; needs the tensorrt backend in the
                tritonserver used (the nvidia-pytriton wheel ships only the python backend: then it says so)

Prints the timing table (step, CPU ms, GPU ms, CPU/GPU, ok, note) and writes gpu_check.json/.md under --out.
`--cpu-only` runs the CPU sides alone (NMS on the device code with NumPy as the array module): what this
project's tests run on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.postprocess.nms import batched_nms  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
BUDGET_S = 7.5 * 60  # the whole check, installs excluded, stays under 8 minutes


@dataclass
class StepResult:
    step: str
    cpu_ms: float | None = None
    gpu_ms: float | None = None
    ok: bool | None = None  # None: not run
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return self.cpu_ms / self.gpu_ms if self.cpu_ms and self.gpu_ms else None


# ---- NMS with the IoU matrix on the device ------------------------------------------------------------

def nms_on_device(xp: Any, boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """backends.postprocess.nms.nms's result with the pairwise IoU matrix computed by `xp` (cupy or numpy).

    The order (descending score, ties in input order) is taken on the host; the n x n "suppresses" matrix on the
    device; the greedy pass walks it on the host (n is the detector's top-k, 100 here)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    b = xp.asarray(boxes[order])
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = xp.maximum(x2 - x1, 0.0) * xp.maximum(y2 - y1, 0.0)
    inter_w = xp.minimum(x2[:, None], x2[None, :]) - xp.maximum(x1[:, None], x1[None, :])
    inter_h = xp.minimum(y2[:, None], y2[None, :]) - xp.maximum(y1[:, None], y1[None, :])
    inter = xp.maximum(inter_w, 0.0) * xp.maximum(inter_h, 0.0)
    union = areas[:, None] + areas[None, :] - inter
    iou = xp.where(union > 0.0, inter / xp.where(union > 0.0, union, 1.0), 0.0)
    over = iou > iou_threshold
    over = over.get() if hasattr(over, "get") else np.asarray(over)
    removed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed[i + 1:] |= over[i, i + 1:]
    return order[np.asarray(keep, dtype=np.int64)]


def batched_nms_on_device(xp: Any, boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                          iou_threshold: float) -> np.ndarray:
    """Class-aware, with the same offset trick as backends.postprocess.nms.batched_nms."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    _, rank = np.unique(np.asarray(class_ids).reshape(-1), return_inverse=True)
    span = float(boxes.max() - boxes.min()) + 1.0
    return nms_on_device(xp, boxes + (rank.reshape(-1) * span)[:, None], scores, iou_threshold)


def median_ms(fn: Callable[[], object], runs: int, sync: Callable[[], object] = lambda: None) -> float:
    fn(), sync()  # warm-up (CUDA context, kernel compilation)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# ---- steps ------------------------------------------------------------------------------------------------

def environment() -> tuple[StepResult, dict[str, Any]]:
    info: dict[str, Any] = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    try:
        import cupy

        info["cupy"] = f"{cupy.__version__}, {cupy.cuda.runtime.getDeviceCount()} device(s)"
    except Exception as exc:  # noqa: BLE001 - reported
        info["cupy"] = f"unusable: {type(exc).__name__}: {exc}"
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        info["tensorrt"] = f"not installed ({exc})"
    try:
        from edgestack.server import find_triton

        info["triton_backends"] = sorted(p.name for p in find_triton().backend_dir.iterdir() if p.is_dir())
    except Exception as exc:  # noqa: BLE001
        info["triton_backends"] = f"unknown: {exc}"
    gpu = "device(s)" in info["cupy"] and not info["cupy"].endswith(" 0 device(s)")
    return StepResult("environment", ok=gpu, note="; ".join(f"{k}: {v}" for k, v in info.items())), info


def preprocess_parity() -> StepResult:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/unit/test_preprocess_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1]
    ran = out.returncode == 0 and "passed" in summary and "skipped" not in summary
    return StepResult("preprocess parity (pytest)", ok=ran, note=summary)


def load_photos(limit: int | None = None) -> list[bytes]:
    paths = sorted(p for p in (FIXTURES / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [p.read_bytes() for p in paths[:limit]]


def input_spec(spec) -> Any:
    from builder.settings import preprocess_settings

    return preprocess_settings(spec).input


def preprocess_timing(spec, photos: list[bytes], runs: int, xp: Any | None) -> StepResult:
    from backends.preprocess.image_ops import decode_image, prepare_input

    ispec = input_spec(spec)
    rgbs = [decode_image(p) for p in photos]
    cpu = median_ms(lambda: [prepare_input(rgb, ispec) for rgb in rgbs], runs) / len(rgbs)
    if xp is None:
        return StepResult("preprocess (per photo)", cpu, None, None, "GPU side not run: no CuPy device")
    from backends.preprocess.gpu_ops import prepare_input_gpu

    sync = xp.cuda.Device().synchronize
    gpu = median_ms(lambda: [prepare_input_gpu(rgb, ispec) for rgb in rgbs], runs, sync) / len(rgbs)
    return StepResult("preprocess (per photo)", cpu, gpu, True, "host->device copy included")


def detector_candidates(spec, photos: list[bytes], threads: int) -> list[np.ndarray]:
    """The detector's raw [100, 6] rows (x1, y1, x2, y2, score, class) per photo, ONNX Runtime on the CPU."""
    from backends.detector.onnx_runner import make_session
    from backends.preprocess.image_ops import decode_image, prepare_input

    session = make_session(str(spec.model_path), threads)
    ispec = input_spec(spec)
    out = []
    for data in photos:
        tensor, _ = prepare_input(decode_image(data), ispec)
        out.append(session.run([spec.output.names[0]], {spec.input_name: tensor[None]})[0].reshape(-1, 6))
    return out


def nms_check(candidates: list[np.ndarray], iou: float, runs: int, xp: Any) -> StepResult:
    same = sum(np.array_equal(batched_nms(c[:, :4], c[:, 4], c[:, 5], iou),
                              batched_nms_on_device(xp, c[:, :4], c[:, 4], c[:, 5], iou)) for c in candidates)
    ok = same == len(candidates)
    note = f"same kept boxes on {same}/{len(candidates)} photos ({xp.__name__})"
    cpu = median_ms(lambda: [batched_nms(c[:, :4], c[:, 4], c[:, 5], iou) for c in candidates], runs) / len(candidates)
    if xp is np:
        return StepResult("NMS (per photo)", cpu, None, ok, note + "; GPU side not run")
    gpu = median_ms(lambda: [batched_nms_on_device(xp, c[:, :4], c[:, 4], c[:, 5], iou) for c in candidates],
                    runs) / len(candidates)
    return StepResult("NMS (per photo)", cpu, gpu, ok, note)


def calibration(spec, count: int):
    from builder.optimize.calibration import load_calibration_set

    folder = FIXTURES / "images_more" if (FIXTURES / "images_more").is_dir() else FIXTURES / "images"
    return load_calibration_set(folder, input_spec(spec), spec.limits, count)


def build_plans(spec, out: Path, calibration_count: int) -> tuple[list[StepResult], dict[str, Any]]:
    from builder.optimize.tensorrt_variants import build_tensorrt
    from builder.optimize.variants import save_variant

    results, variants = [], {}
    for precision in ("fp16", "int8"):
        t0 = time.perf_counter()
        try:
            calib = calibration(spec, calibration_count) if precision == "int8" else None
            variant = build_tensorrt(spec.model_path, out / f"trt-{precision}", precision, calibration=calib)
            save_variant(variant)
            variants[precision] = variant
            note = f"built in {time.perf_counter() - t0:.1f} s" + (f", {len(calib)} calibration photos" if calib else "")
            results.append(StepResult(f"TensorRT {precision.upper()} build", ok=True, note=note))
        except Exception as exc:  # noqa: BLE001 - reported, the other steps go on
            results.append(StepResult(f"TensorRT {precision.upper()} build", ok=False, note=f"{type(exc).__name__}: {exc}"))
    return results, variants


def run_plan(plan: Path, tensor: np.ndarray, output_name: str) -> tuple[Callable[[], object], Callable[[], np.ndarray], Any]:
    """(run once, read the named output, sync) for a serialized TensorRT engine, buffers in CuPy."""
    import cupy
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = tuple(tensor.shape)
            context.set_input_shape(name, shape)
            buffers[name] = cupy.asarray(tensor.astype(trt.nptype(engine.get_tensor_dtype(name))))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = cupy.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
        context.set_tensor_address(name, int(buffers[name].data.ptr))
    stream = cupy.cuda.Stream(non_blocking=True)

    def run() -> object:
        return context.execute_async_v3(stream.ptr)

    return run, lambda: cupy.asnumpy(buffers[output_name]), stream.synchronize


def plan_timing(spec, variants: dict[str, Any], photos: list[bytes], runs: int, threads: int) -> list[StepResult]:
    from backends.detector.onnx_runner import make_session
    from backends.preprocess.image_ops import decode_image, prepare_input

    tensor = prepare_input(decode_image(photos[0]), input_spec(spec))[0][None]
    session = make_session(str(spec.model_path), threads)
    name = spec.output.names[0]
    reference = session.run([name], {spec.input_name: tensor})[0]
    cpu = median_ms(lambda: session.run([name], {spec.input_name: tensor}), runs)
    results = []
    for precision, variant in variants.items():
        try:
            run, read, sync = run_plan(variant.path, tensor, name)
            gpu = median_ms(run, runs, sync)
            got = read().reshape(reference.shape)
            top = reference[0, :10, 4] > 0.35  # the confident candidates' boxes
            diff = float(np.abs(got[0, :10, :4][top] - reference[0, :10, :4][top]).max()) if top.any() else 0.0
            results.append(StepResult(f"detector TensorRT {precision.upper()} vs ORT FP32 ({threads} threads)", cpu,
                                      gpu, True, f"max box difference of confident detections {diff:.2f} px"))
        except Exception as exc:  # noqa: BLE001
            results.append(StepResult(f"detector TensorRT {precision.upper()}", cpu, None, False,
                                      f"{type(exc).__name__}: {exc}"))
    return results


def serve_compare(spec, variant, photos: list[bytes], requests: int, tmp: Path) -> list[StepResult]:
    """The cpu target and the nvidia-gpu target (the FP16 plan) served in turn; per step mean ms from Triton."""
    from builder.repository import target_for
    from edgestack.latency_budget import measure_budget
    from edgestack.server import TritonServer, find_triton
    from ensembles import render_pipeline

    backends = {p.name for p in find_triton().backend_dir.iterdir()}
    if "tensorrt" not in backends:
        return [StepResult("serve nvidia-gpu", ok=None,
                           note=f"not run: this tritonserver has backends {sorted(backends)}, no tensorrt "
                                "(the nvidia-pytriton wheel ships the python backend only; use the NGC tritonserver "
                                "image, docs/GPU_CHECK.md)")]
    budgets = {}
    for name, s, v in (("cpu", spec.replace(target="cpu"), None), ("gpu", spec.replace(target="nvidia-gpu"), variant)):
        repo = render_pipeline(s, tmp / f"repo-{name}", target_for(s), variant=v)
        with TritonServer(repo, log_path=tmp / f"tritonserver-{name}.log") as server:
            budgets[name] = measure_budget(server.grpc_url, s.name, photos, requests, warmup=3)
    cpu_steps = {s.model: s.total_ms for s in budgets["cpu"].steps}
    rows = [StepResult(f"served: {s.model}", cpu_steps.get(s.model), s.total_ms, True, "queue + compute, mean")
            for s in budgets["gpu"].steps]
    rows.append(StepResult("served: client total (mean)", budgets["cpu"].client_total_mean_ms,
                           budgets["gpu"].client_total_mean_ms, True, f"{requests} sequential gRPC requests"))
    return rows


# ---- report ---------------------------------------------------------------------------------------------

def table(results: list[StepResult]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| step | CPU ms | GPU ms | CPU/GPU | ok | note |", "|---|---|---|---|---|---|"]
    for r in results:
        ok = {True: "yes", False: "NO", None: "not run"}[r.ok]
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(f"| {r.step} | {ms(r.cpu_ms)} | {ms(r.gpu_ms)} | {speed} | {ok} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "centernet_coco.yaml"))
    parser.add_argument("--out", default=str(ROOT / "build" / "gpu_check"))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per step (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="ORT CPU threads")
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per served target")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip steps that would start after this")
    parser.add_argument("--cpu-only", action="store_true", help="the CPU sides only (no GPU needed)")
    args = parser.parse_args(argv)

    from builder.spec import load_spec

    started = time.monotonic()
    spec = load_spec(args.spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    env, info = environment()
    results = [env]
    xp = None
    if not args.cpu_only and env.ok:
        import cupy as xp
    steps: list[tuple[str, Callable[[], list[StepResult]]]] = [
        ("preprocess", lambda: ([preprocess_parity()] if xp is not None else [])
         + [preprocess_timing(spec, photos, args.runs, xp)]),
        ("nms", lambda: [nms_check(detector_candidates(spec, photos, args.threads), args.iou, args.runs, xp or np)]),
    ]
    variants: dict[str, Any] = {}
    if xp is not None:
        def plans() -> list[StepResult]:
            built, found = build_plans(spec, out / "variants", args.calibration_count)
            variants.update(found)
            return built + plan_timing(spec, variants, photos, args.runs, args.threads)

        steps.append(("tensorrt", plans))
        steps.append(("serve", lambda: serve_compare(spec, variants["fp16"], photos, args.requests, Path(tmp))
                      if "fp16" in variants else [StepResult("serve nvidia-gpu", ok=None, note="no FP16 plan")]))
    else:
        results.append(StepResult("TensorRT plans, serving", ok=None, note="not run: no usable CUDA device here"))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name, step in steps:
            if time.monotonic() - started > args.budget_s:
                results.append(StepResult(name, ok=None, note=f"skipped: past the {args.budget_s:.0f} s budget"))
                continue
            try:
                results.extend(step())
            except Exception as exc:  # noqa: BLE001 - one broken step must not hide the others
                results.append(StepResult(name, ok=False, note=f"{type(exc).__name__}: {exc}"))
    text = table(results)
    print(text)
    print(f"\n{time.monotonic() - started:.0f} s; results in {out}/gpu_check.md and .json")
    (out / "gpu_check.md").write_text(f"# GPU check\n\n{json.dumps(info)}\n\n{text}\n")
    (out / "gpu_check.json").write_text(json.dumps({"environment": info, "steps": [
        {**dataclasses.asdict(r), "speedup": r.speedup} for r in results]}, indent=2) + "\n")
    failed = [r.step for r in results if r.ok is False and r.step != "environment"]
    return 1 if failed or (not args.cpu_only and not env.ok) else 0


if __name__ == "__main__":
    sys.exit(main())
