"""`edgestack optimize`: one model + spec -> every requested variant, measured, reported, and one picked.

Order matters for honesty and safety: the calibration images are checked before any work; every
variant is built into its own folder (complete or absent); all variants are measured in this one
process with the same threads and images, FP32 first as the baseline and the pseudo ground truth.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backends.common.files import image_folder
from builder.device_class import host_class
from builder.errors import BuilderError
from builder.optimize import int8_classes
from builder.optimize.calibration import CalibrationSet, load_calibration_set
from builder.optimize.variants import Variant, VariantRunner, save_variant
from builder.spec import PipelineSpec

QUANT_CALIBRATIONS = ("minmax", "entropy", "percentile")
# fidelity mAP@0.5 vs FP32, measured on this machine, under which a variant is never picked
DEFAULT_ACCURACY_FLOOR = 0.90
# int8-mean-quantile: the FAST_INT8 recipe of ort_variants (mean-quantile ranges, Resize float, scalar Muls folded)
KNOWN_VARIANTS = ("fp32", "fp16", *(f"int8-{c}" for c in QUANT_CALIBRATIONS), "int8-mean-quantile", "ov-fp32",
                  "ov-fp16", "ov-int8", "trt-fp16", "trt-int8")
DEFAULT_VARIANTS = ("fp32", "int8-entropy", "int8-mean-quantile", "ov-fp32", "ov-int8")


@dataclass(frozen=True)
class OptimizeSettings:
    calibration_dir: Path
    eval_dir: Path
    out_dir: Path
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    calibration_count: int | None = None
    threads: int = 1
    per_channel: bool = True
    symmetric_activations: bool = False
    keep_head_float: bool = True
    labels: Path | None = None
    latency_budget_ms: float | None = None
    accuracy_floor: float = DEFAULT_ACCURACY_FLOOR
    device_class: str | None = None  # the CPU class the INT8 variants are built for; None: this machine's
    latency_runs: int = 30
    throughput_seconds: float = 3.0

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in KNOWN_VARIANTS]
        if unknown:
            raise BuilderError(f"unknown variant(s) {unknown}; known: {', '.join(KNOWN_VARIANTS)}")
        if self.threads < 1:
            raise BuilderError(f"threads must be >= 1, got {self.threads}")
        if isinstance(self.accuracy_floor, bool) or not isinstance(self.accuracy_floor, (int, float)) \
                or not 0.0 <= self.accuracy_floor <= 1.0:
            raise BuilderError(f"accuracy floor must be a mAP@0.5 in [0, 1], got {self.accuracy_floor!r}")
        if self.device_class is not None:
            int8_classes.settings_for(self.device_class)

    def target_class(self) -> str:
        return self.device_class or host_class()


def _builders(spec: PipelineSpec, settings: OptimizeSettings, calibration: CalibrationSet) -> dict[str, Callable[[Path], Variant]]:
    from builder.optimize import openvino_variants as ov
    from builder.optimize import ort_variants as ort
    from builder.optimize.tensorrt_variants import build_tensorrt

    source = spec.model_path
    head = ort.default_head_exclusions(source) if settings.keep_head_float else ()
    isa = int8_classes.settings_for(settings.target_class())

    def int8(**recipe) -> Callable[[Path], Variant]:
        options = ort.QuantOptions(**{"per_channel": settings.per_channel, **recipe, **isa.ort},
                                   symmetric_activations=settings.symmetric_activations, exclude_nodes=tuple(head))
        return lambda out: ort.build_int8(source, out, calibration, spec.input_name, options)

    builders: dict[str, Callable[[Path], Variant]] = {
        "fp32": lambda out: ort.build_fp32(source, out),
        "fp16": lambda out: ort.build_fp16(source, out),
        "ov-fp32": lambda out: ov.build_openvino(source, out, "fp32"),
        "ov-fp16": lambda out: ov.build_openvino(source, out, "fp16"),
        "ov-int8": lambda out: ov.build_openvino_int8(source, out, calibration, overflow_fix=isa.openvino_overflow_fix),
        "trt-fp16": lambda out: build_tensorrt(source, out, "fp16"),
        "trt-int8": lambda out: build_tensorrt(source, out, "int8", calibration=calibration),
    }
    builders.update({f"int8-{m}": int8(calibration=m) for m in QUANT_CALIBRATIONS})
    builders["int8-mean-quantile"] = int8(**ort.FAST_INT8)
    return builders


def make_runner(variant: Variant, spec: PipelineSpec, threads: int, fixed_batch: int | None) -> VariantRunner:
    if variant.runtime == "onnxruntime":
        from backends.detector.onnx_runner import OnnxDetector, make_session

        return OnnxDetector(make_session(str(variant.path), threads), spec.input_name, spec.output.names, fixed_batch)
    if variant.runtime == "openvino":
        from backends.detector.openvino_runner import OpenVinoDetector

        return OpenVinoDetector(str(variant.path), spec.input_name, spec.output.names, threads)
    raise BuilderError(f"variant {variant.name}: {variant.runtime} runs only on its GPU device; not measured here")


def _measure(variant: Variant, spec: PipelineSpec, settings: OptimizeSettings, images: list[Path], tensors: list,
             fixed_batch: int | None, reference) -> tuple[dict, list]:
    from builder.optimize import evaluate, variant_stats
    from builder.optimize.report import variant_row

    runner = make_runner(variant, spec, settings.threads, fixed_batch)
    detections = evaluate.detect_images(runner, spec, images)
    labelled = None
    if settings.labels is not None:
        labelled = evaluate.labelled_map(settings.labels, detections, [p.name for p in images], spec.classes)
    if variant.runtime == "onnxruntime" and variant.precision == "int8":
        from builder.optimize.ort_variants import quantized_op_counts

        quantized_ops = quantized_op_counts(variant.path)
    else:
        quantized_ops = variant_stats.quantized_op_counts(variant) if variant.precision == "int8" else None
    row = variant_row(
        variant,
        stats=variant_stats.file_stats(variant),
        latency=evaluate.measure_latency(runner, tensors, runs=settings.latency_runs, warmup=3),
        throughput=evaluate.measure_throughput(runner, tensors, (1, 2, 4, 8), settings.throughput_seconds,
                                               fixed_batch=fixed_batch),
        fidelity=evaluate.fidelity_map(detections if reference is None else reference, detections,
                                       reference_score_threshold=spec.thresholds.score),
        labelled=labelled,
        quantized_ops=quantized_ops,
    )
    row["options"] = variant.options
    return row, detections


def optimize(spec: PipelineSpec, settings: OptimizeSettings, log: Callable[[str], None] = print) -> dict:
    """Build, measure and report every variant; returns {"rows", "selection", "report": paths}."""
    from builder.model_inspect import inspect_onnx
    from builder.optimize.manifest import build_manifest, write_manifest
    from builder.optimize.report import write_report
    from builder.optimize.select import refusals, select_variant

    calibration = load_calibration_set(settings.calibration_dir, spec.input, spec.limits, settings.calibration_count)
    images = image_folder(settings.eval_dir, BuilderError, "evaluation folder")
    eval_tensors = list(load_calibration_set(settings.eval_dir, spec.input, spec.limits).batches())
    fixed_batch = inspect_onnx(spec.model_path).fixed_batch
    host, target = host_class(), settings.target_class()
    log(f"calibration: {len(calibration)} images ({calibration.sha256[:12]}); evaluation: {len(images)} images; "
        f"{settings.threads} thread(s); INT8 for device class {target}, measured on {host}")

    builders = _builders(spec, settings, calibration)
    order = ["fp32"] + [v for v in settings.variants if v != "fp32"]
    rows, skipped, reference = [], {}, None
    variants_dir = Path(settings.out_dir) / "variants"
    for name in order:
        log(f"building {name} ...")
        try:
            variant = builders[name](variants_dir / name)
        except BuilderError as exc:
            if name.startswith("trt-"):
                skipped[name] = str(exc)
                log(f"  skipped {name}: {exc}")
                continue
            raise
        row, detections = _measure(variant, spec, settings, images, eval_tensors, fixed_batch, reference)
        if reference is None:
            reference = detections
        classes = int8_classes.artifact_classes(int8_classes.built_for(variant), host, target).to_dict()
        row["device_classes"] = classes
        manifest = build_manifest(variant, source_model=spec.model_path, spec=spec,
                                  calibration_sha256=variant.options.get("calibration_sha256"), metrics=row,
                                  device_classes=classes)
        write_manifest(manifest, variant.path.parent)
        save_variant(variant, manifest, device_classes=classes)
        rows.append(row)
        log(f"  {name}: p50 {row['p50_ms']:.1f} ms, mAP@0.5 vs fp32 {row['map50']:.3f}")

    selection = select_variant(rows, latency_budget_ms=settings.latency_budget_ms, accuracy_floor=settings.accuracy_floor)
    refused = refusals(rows, latency_budget_ms=settings.latency_budget_ms, accuracy_floor=settings.accuracy_floor)
    for row in rows:
        row["refused"] = refused.get(row["name"])
    context = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": settings.threads,
               "host_device_class": host, "int8_device_class": target,
               "evaluation_images": len(images), "calibration_images": len(calibration),
               "calibration_sha256": calibration.sha256, "skipped": skipped,
               "latency_budget_ms": settings.latency_budget_ms, "accuracy_floor": settings.accuracy_floor}
    paths = write_report(rows, Path(settings.out_dir), selection=selection, context=context)
    return {"rows": rows, "selection": selection, "report": paths, "skipped": skipped}
