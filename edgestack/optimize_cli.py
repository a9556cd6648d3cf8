"""`edgestack optimize`: build and measure model variants, write the report, pick one."""
from __future__ import annotations

import argparse
from pathlib import Path

from edgestack.inputs import DEFAULT_SPEC


def cmd_optimize(args: argparse.Namespace) -> int:
    from builder.optimize.pipeline import OptimizeSettings, optimize
    from builder.spec import load_spec

    spec = load_spec(args.spec)
    settings = OptimizeSettings(
        calibration_dir=Path(args.calibration), eval_dir=Path(args.eval or args.calibration), out_dir=Path(args.out),
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()), calibration_count=args.calibration_count,
        threads=args.threads, per_channel=not args.per_tensor, symmetric_activations=args.symmetric_activations,
        keep_head_float=not args.quantize_head, labels=Path(args.labels) if args.labels else None,
        latency_budget_ms=args.latency_budget_ms, accuracy_floor=args.accuracy_floor, device_class=args.device_class,
    )
    result = optimize(spec, settings)
    picked, reason = result["selection"]
    print(f"\nreport: {result['report']['md']}")
    print(f"selection: {reason}")
    if picked is not None:
        print(f"serve it: edgestack build {args.spec} --variant {Path(picked['path']).parent} --out model_repository")
    return 0 if picked is not None else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    from builder.device_class import CPU_CLASSES
    from builder.optimize.pipeline import DEFAULT_ACCURACY_FLOOR, DEFAULT_VARIANTS, KNOWN_VARIANTS

    parser = subparsers.add_parser(
        "optimize", help="quantize/compile variants, measure accuracy and latency, report, pick one",
        description="Build model variants (ONNX Runtime FP32/FP16/INT8, OpenVINO IR FP32/FP16/INT8, TensorRT plans "
                    "where a GPU exists), measure each in one run (size, latency p50/p99, throughput, mAP against "
                    "FP32 and against labels if given), write report.md/json/png and pick a variant.")
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    parser.add_argument("--calibration", required=True, metavar="DIR", help="folder of calibration images")
    parser.add_argument("--calibration-count", type=int, help="use exactly this many calibration images (error if fewer)")
    parser.add_argument("--eval", help="folder of evaluation images (default: the calibration folder)")
    parser.add_argument("--labels", help="COCO-format JSON labels of the evaluation images, for true mAP")
    parser.add_argument("--out", default="build/optimize", help="output folder (variants/ and the report)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of: {', '.join(KNOWN_VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="inference threads for every measurement")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    parser.add_argument("--symmetric-activations", action="store_true")
    parser.add_argument("--quantize-head", action="store_true", help="quantize the detection head too (default: keep it float)")
    parser.add_argument("--latency-budget-ms", type=float, help="pick only variants with p50 at or under this")
    parser.add_argument("--accuracy-floor", type=float, default=DEFAULT_ACCURACY_FLOOR,
                        help="never pick a variant whose fidelity mAP@0.5 vs FP32, measured on this machine, is under "
                             "this (default %(default)s)")
    parser.add_argument("--device-class", choices=CPU_CLASSES, default=None,
                        help="CPU class the INT8 variants are built for (default: this machine's, `edgestack "
                             "device-info`); INT8 kernels differ per class (docs/INT8.md)")
    parser.set_defaults(func=cmd_optimize)
    return parser
