"""`edgestack compress`: prune the detector at several ratios, fine-tune (plain and by distillation), quantize,
measure every variant against the FP32 teacher and write the report with a verdict on the claims."""
from __future__ import annotations

import argparse
from pathlib import Path

from edgestack.inputs import DEFAULT_SPEC


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def cmd_compress(args: argparse.Namespace) -> int:
    from builder.compress.pipeline import CompressSettings, compress
    from builder.spec import load_spec

    spec = load_spec(args.spec)
    settings = CompressSettings(
        out_dir=Path(args.out), train_dirs=tuple(Path(d) for d in args.train), eval_dir=Path(args.eval),
        video=Path(args.video) if args.video else None, video_frames=args.video_frames, ratios=args.ratios,
        importance=args.importance, round_to=args.round_to or None, scope=args.scope,
        compensation=args.compensation, anchor=args.anchor, trainings=tuple(t.strip() for t in args.trainings.split(",") if t.strip()),
        int8=not args.no_int8, steps=args.steps, train_seconds=args.train_seconds, batch_size=args.batch_size,
        learning_rate=args.lr, temperature=args.temperature, heat_weighting=args.heat_weighting, threads=args.threads,
        latency_runs=args.latency_runs,
        device_class=args.device_class, seed=args.seed)
    result = compress(spec, settings)
    print(f"\nreport: {result['report']['md']}")
    for claim in result["claims"]:
        print(f"claim: {claim['claim']}: {claim['verdict']}")
    goal = result["goal"]
    print(f"goal: {'met' if goal['met'] else 'not met'}: {goal['evidence']}")
    if goal["row"]:
        folder = next(r["path"] for r in result["rows"] if r["name"] == goal["row"])
        print(f"{'serve it' if goal['met'] else 'best distilled INT8 student'}: edgestack build {args.spec} "
              f"--variant {folder} --out model_repository")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    from builder.compress.pipeline import TRAININGS
    from builder.device_class import CPU_CLASSES

    parser = subparsers.add_parser(
        "compress", help="prune, fine-tune/distill, quantize; measure against the FP32 teacher; report",
        description="Structured pruning at each ratio, then no fine-tuning, plain fine-tuning and distillation from "
                    "the FP32 teacher (no labels), each exported to ONNX and quantized to INT8; every variant measured "
                    "in this run (parameters, file size, MACs, paired 1-thread latency, fidelity mAP against the "
                    "teacher); report.md/json/png with a verdict on the claims. Progress on stderr; training resumes "
                    "from the checkpoints in OUT/checkpoints.")
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC))
    parser.add_argument("--train", action="append", required=True, metavar="DIR",
                        help="folder of unlabelled training images (repeatable); never the evaluation images")
    parser.add_argument("--video", help="a video whose frames are more training images")
    parser.add_argument("--video-frames", type=int, default=20, help="frames taken from --video (default %(default)s)")
    parser.add_argument("--eval", required=True, metavar="DIR", help="held-out evaluation images")
    parser.add_argument("--out", default="build/compress", help="output folder (variants/, checkpoints/, the report)")
    parser.add_argument("--ratios", type=_floats, default=(0.3, 0.5, 0.7), help="pruning ratios (default 0.3,0.5,0.7)")
    parser.add_argument("--importance", choices=("magnitude", "bn-scale", "activation"), default="activation",
                        help="channel ranking: weight magnitude, batchnorm scale, or each channel's share of its "
                             "consumers' output variance on the training images (activation: keeps this detector "
                             "far better, docs/COMPRESSION_PARTS.md)")
    parser.add_argument("--scope", choices=("group", "global"), default="global",
                        help="prune the ratio of every group, or of all channels ranked together (global, default)")
    parser.add_argument("--compensation", choices=("mean", "least-squares"), default="least-squares",
                        help="what the layers reading a removed channel get back: its mean in their bias, or its linear "
                             "regression on the kept channels in their weights (default; builder/compress/compensate.py)")
    parser.add_argument("--round-to", type=int, default=16,
                        help="keep pruned channel counts multiples of this (default %(default)s; 0: exact ratio). Unaligned "
                             "counts leave ONNX Runtime's blocked convolutions: a 30%% pruned student ran 1.6x slower than "
                             "the teacher, aligned to 16 1.17x faster")
    parser.add_argument("--trainings", default=",".join(TRAININGS), help=f"comma list of: {', '.join(TRAININGS)}")
    parser.add_argument("--no-int8", action="store_true", help="leave out the INT8 variants")
    parser.add_argument("--steps", type=int, default=150, help="training steps per student (default %(default)s)")
    parser.add_argument("--train-seconds", type=float, help="also stop each training after this many seconds")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--anchor", type=float, default=0.0,
                        help="L2-SP: pull the student's weights back to the pruned start with this weight (relative "
                             "squared drift); against forgetting the classes the training images lack (default 0)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default %(default)s)")
    parser.add_argument("--heat-weighting", choices=("foreground", "uniform"), default="foreground",
                        help="distillation: weigh the heatmap KL by the models' confidence per pixel (default) or not")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--latency-runs", type=int, default=30, help="paired latency rounds per variant")
    parser.add_argument("--device-class", choices=CPU_CLASSES, default=None,
                        help="CPU class the INT8 variants are built for (default: this machine's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_compress)
    return parser
