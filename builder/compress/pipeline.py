"""`edgestack compress`: the teacher -> pruned students at each ratio -> fine-tuned (plain, distilled) -> INT8, each
exported, measured against the teacher in this one run, and reported with a verdict on the issue's claims.

Per ratio, the variants are: pruned without fine-tuning ("none"), pruned + plain fine-tuning ("plain"), pruned +
distillation ("distill"), and each of them + INT8 by the builder's recipe; the FP32 teacher and its INT8 variant
are the baselines. Every variant is measured the same way, in this process, with the same threads and images:
- fidelity: the variant's detections (the server's own preprocess/postprocess, builder.optimize.evaluate) against
  the FP32 teacher's on the held-out evaluation images, mAP@0.5 and mAP@0.5:0.95 by pycocotools;
- latency: ONNX Runtime, batch 1, `threads` threads, the teacher and the variant called in alternation
  (paired_latency), so the speedup compares two numbers taken under the same load;
- parameters and MACs of the trainable part (Torch-Pruning's count), file size of the variant's files.

Training images never include an evaluation image (distill.check_disjoint); the teacher's bias compensation for
pruning uses training images only. Training resumes from the checkpoints in out_dir/checkpoints when the run is
started again with the same settings.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from builder.compress import CompressError

TRAININGS = ("none", "plain", "distill")


@dataclass(frozen=True)
class CompressSettings:
    out_dir: Path
    train_dirs: tuple[Path, ...]
    eval_dir: Path
    video: Path | None = None
    video_frames: int = 20
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    importance: str = "magnitude"
    round_to: int | None = 16  # channel counts kept multiples of this: ORT's blocked (NCHWc) convolutions need it
    scope: str = "group"  # "global": all channels ranked together (with importance "activation"; prune.py)
    compensation: str = "mean"  # or "least-squares" (builder/compress/compensate.py)
    anchor: float = 0.0  # distillation's L2-SP weight (distill.DistillSettings.anchor)
    trainings: tuple[str, ...] = TRAININGS
    int8: bool = True
    steps: int = 150
    train_seconds: float | None = None  # per training, on top of steps
    batch_size: int = 2
    learning_rate: float = 1e-4
    temperature: float = 2.0
    heat_weighting: str = "foreground"
    threads: int = 1
    latency_runs: int = 30
    device_class: str | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [t for t in self.trainings if t not in TRAININGS]
        if unknown:
            raise CompressError(f"unknown training(s) {unknown}; known: {', '.join(TRAININGS)}")
        bad = [r for r in self.ratios if not 0.0 < float(r) < 1.0]
        if not self.ratios or bad:
            raise CompressError(f"pruning ratios must be in (0, 1), got {list(self.ratios)}")
        if self.threads < 1 or self.latency_runs < 1:
            raise CompressError(f"threads and latency_runs must be >= 1, got {self.threads}, {self.latency_runs}")


def paired_latency(teacher: Any, candidate: Any, tensors: list[np.ndarray], runs: int, warmup: int = 3) -> dict:
    """Batch-1 latency of candidate and teacher called in alternation (order swapped every round) on the same tensors.

    speedup: teacher p50 / candidate p50 over the same rounds."""
    batches = [np.ascontiguousarray(t if t.ndim == 4 else t[None]) for t in tensors]
    for i in range(warmup):
        teacher.run_outputs(batches[i % len(batches)])
        candidate.run_outputs(batches[i % len(batches)])
    times = {"teacher": np.empty(runs), "candidate": np.empty(runs)}
    for i in range(runs):
        batch = batches[i % len(batches)]
        order = (("teacher", teacher), ("candidate", candidate)) if i % 2 == 0 else \
            (("candidate", candidate), ("teacher", teacher))
        for key, runner in order:
            start = time.perf_counter()
            runner.run_outputs(batch)
            times[key][i] = (time.perf_counter() - start) * 1000.0
    p50, teacher_p50 = float(np.median(times["candidate"])), float(np.median(times["teacher"]))
    return {"p50_ms": p50, "p99_ms": float(np.percentile(times["candidate"], 99)), "teacher_p50_ms": teacher_p50,
            "speedup": teacher_p50 / p50, "runs": runs}


class _Context:
    """What every variant is measured with: the spec, the teacher's runner and detections, the evaluation images."""

    def __init__(self, spec, settings: CompressSettings, images: list[Path], teacher_variant) -> None:
        from builder.model_inspect import inspect_onnx
        from builder.optimize import evaluate
        from builder.optimize.pipeline import make_runner

        self.spec, self.settings, self.images = spec, settings, images
        self.fixed_batch = inspect_onnx(spec.model_path).fixed_batch
        self.tensors = [t for t, *_ in evaluate.prepare_images(spec, images)]
        self.teacher_runner = make_runner(teacher_variant, spec, settings.threads, self.fixed_batch)
        self.reference = evaluate.detect_images(self.teacher_runner, spec, images)

    def measure(self, variant, **fields: Any) -> dict[str, Any]:
        from builder.optimize import evaluate, variant_stats
        from builder.optimize.pipeline import make_runner

        runner = make_runner(variant, self.spec, self.settings.threads, self.fixed_batch)
        detections = evaluate.detect_images(runner, self.spec, self.images)
        fidelity = evaluate.fidelity_map(self.reference, detections,
                                         reference_score_threshold=self.spec.thresholds.score)
        latency = paired_latency(self.teacher_runner, runner, self.tensors, self.settings.latency_runs)
        stats = variant_stats.file_stats(variant)
        return {"name": variant.name, "precision": variant.precision, "path": str(variant.path.parent),
                "file_bytes": stats["file_bytes"], **latency, "map50": fidelity["map50"],
                "map50_95": fidelity["map50_95"], "fidelity_note": fidelity.get("note"), "error": None, **fields}


def _training_images(settings: CompressSettings, eval_images: list[Path]) -> list[Path]:
    from builder.compress import distill

    images = distill.training_images(settings.train_dirs)
    if settings.video is not None:
        images += distill.video_frames(settings.video, Path(settings.out_dir) / "video_frames",
                                       limit=settings.video_frames)
    distill.check_disjoint(images, eval_images)
    return images


def compress(spec, settings: CompressSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, train, export and measure every variant; write the report. Returns {"rows", "report", ...}."""
    import torch

    from backends.common.files import image_folder
    from builder.compress import distill, set_torch_threads
    from builder.compress.export import build_student_variant, export_student
    from builder.compress.prune import PruneSettings, clone, count_macs_params, prune
    from builder.compress.report import write_report
    from builder.compress.torch_copy import check_equality, to_torch
    from builder.device_class import host_class
    from builder.optimize.calibration import load_calibration_set

    set_torch_threads(settings.threads)
    out = Path(settings.out_dir)
    variants_dir = out / "variants"
    eval_images = image_folder(settings.eval_dir, CompressError, "evaluation folder")
    train_images = _training_images(settings, eval_images)
    calibration = load_calibration_set(settings.train_dirs[0], spec.input, spec.limits)
    size = (spec.input.width, spec.input.height)
    log(f"training: {len(train_images)} images; evaluation: {len(eval_images)} held-out images; "
        f"{settings.threads} thread(s); ratios {list(settings.ratios)}")

    def variant(onnx_path: Path, name: str, int8: bool, record: dict | None = None):
        return build_student_variant(onnx_path, variants_dir / name, name, spec, record=record,
                                     calibration=calibration if int8 else None, device_class=settings.device_class)

    teacher_variant = variant(spec.model_path, "teacher-fp32", False)
    ctx = _Context(spec, settings, eval_images, teacher_variant)
    copy = to_torch(spec.model_path, out / "work", threads=settings.threads)
    equality = check_equality(copy, np.stack(ctx.tensors[:2]), threads=settings.threads)
    log(f"torch copy vs ONNX Runtime: max abs diff {equality.max_abs_diff}, passed {equality.passed}")
    if not equality.passed:
        raise CompressError(f"the PyTorch copy differs from ONNX Runtime: {equality.to_dict()}")
    macs, params = count_macs_params(copy)
    teacher_fields = {"ratio": 0.0, "training": "teacher", "parameters": params, "macs": macs}
    rows = [ctx.measure(teacher_variant, **teacher_fields)]
    if settings.int8:
        rows.append(ctx.measure(variant(spec.model_path, "teacher-int8", True), **teacher_fields))
    log(f"  teacher: p50 {rows[0]['p50_ms']:.1f} ms")

    data = distill.AugmentedImages(train_images, size, distill.DistillSettings(seed=settings.seed))
    pruning_images = data.batch(10**6, 8)  # training images only (bias compensation); a step index never trained
    teacher = distill.OnnxTeacher(spec.model_path, spec.input_name, threads=settings.threads)
    student_io = distill.StudentIO("NCHW", "NCHW", "logits")
    for ratio in settings.ratios:
        prune_settings = PruneSettings(float(ratio), settings.importance, settings.round_to, scope=settings.scope,
                                       compensation=settings.compensation)
        pruned = prune(copy, prune_settings, pruning_images)
        log(f"ratio {ratio}: {pruned.params_after:,} parameters ({pruned.params_before:,} before)")
        for training in settings.trainings:
            name = f"r{round(ratio * 100)}-{training}"
            student, train = clone(pruned.copy), None
            if training != "none":
                train_settings = distill.DistillSettings(
                    mode=training, temperature=settings.temperature, heat_weighting=settings.heat_weighting,
                    steps=settings.steps,
                    max_seconds=settings.train_seconds, batch_size=settings.batch_size,
                    learning_rate=settings.learning_rate, anchor=settings.anchor, seed=settings.seed,
                    threads=settings.threads)
                (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                result = distill.distill(student.module, teacher, data, train_settings, io_spec=student_io,
                                         checkpoint=out / "checkpoints" / f"{name}.ckpt", label=name)
                train = {"steps": result.steps, "seconds": result.seconds, "stopped_by": result.stopped_by,
                         "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None,
                         "resumed_from": result.resumed_from, "settings": asdict(train_settings)}
            fields = {"ratio": float(ratio), "training": training, "parameters": pruned.params_after,
                      "macs": pruned.macs_after, "train": train, "pruning": pruned.to_dict()}
            onnx_path, check = export_student(student, out / "students" / f"{name}.onnx", pruning_images[:1])
            record = {"pruning": pruned.to_dict(), "train": train, "export_check": check.to_dict()}
            for precision in ("fp32", "int8") if settings.int8 else ("fp32",):
                built = variant(onnx_path, f"{name}-{precision}", precision == "int8", record)
                rows.append(ctx.measure(built, **fields))
                log(f"  {name}-{precision}: {rows[-1]['speedup']:.2f}x the teacher, mAP@0.5 {rows[-1]['map50']:.3f}")
            del student
            torch.set_num_threads(settings.threads)

    context = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "device_class": host_class(), "threads": settings.threads, "evaluation_images": len(eval_images),
               "training_images": len(train_images), "importance": settings.importance, "round_to": settings.round_to,
               "scope": settings.scope, "compensation": settings.compensation, "anchor": settings.anchor,
               "steps": settings.steps,
               "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
               "temperature": settings.temperature, "heat_weighting": settings.heat_weighting,
               "reference_score_threshold": spec.thresholds.score,
               "torch_copy_max_abs_diff": equality.max_abs_diff}
    report = write_report(rows, out, context)
    return {"rows": rows, "report": report["paths"], "claims": report["claims"], "goal": report["goal"]}
