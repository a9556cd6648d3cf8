"""`edgestack bundle golden` and the golden options of `bundle create` (sidecar/golden.py does the work).

  edgestack bundle golden --images DIR --spec SPEC --out golden.json        # or --repository REPO
  edgestack bundle create MODEL_VERSION_DIR ... --golden-images DIR [--golden-spec SPEC]
  edgestack bundle create MODEL_VERSION_DIR ... --expected-outputs golden.json

Without --golden-spec, bundle create takes the reference's settings and source model from the
<name>.pipeline.json of the repository MODEL_VERSION_DIR is in. Hand-written expected outputs are judged
too, against the score threshold of --golden-spec or of that repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sidecar.golden import FLAGS, GoldenCriteria


def add_criteria_options(parser: argparse.ArgumentParser) -> None:
    defaults = GoldenCriteria()
    what = {"min_detections": "confident detections over all images", "min_images": "images with a confident detection",
            "min_classes": "distinct classes among the confident detections"}
    for field, flag in FLAGS.items():
        parser.add_argument(flag, type=int, default=getattr(defaults, field), metavar="N",
                            help=f"refuse a golden set with fewer {what[field]} (default {getattr(defaults, field)}); "
                                 f"confident: score >= the spec's threshold + {defaults.margin} (the gate's tolerance)")


def add_bundle_create_options(create: argparse.ArgumentParser) -> None:
    create.add_argument("--golden-images", nargs="+", metavar="PATH",
                        help="images (files or folders) the reference FP32 pipeline runs on: its detections are signed "
                             "as the expected outputs the health gate checks (instead of --expected-outputs)")
    create.add_argument("--golden-spec", metavar="SPEC",
                        help="spec of the reference (source FP32 model and settings); default: the .pipeline.json of "
                             "the repository MODEL_VERSION_DIR is in")
    add_criteria_options(create)


def _criteria(args: argparse.Namespace) -> GoldenCriteria:
    return GoldenCriteria(**{field: getattr(args, flag.lstrip("-").replace("-", "_")) for field, flag in FLAGS.items()})


def _print_set(made: dict[str, Any], class_names: tuple[str, ...]) -> None:
    golden, counts, out = made["golden"], made["golden"]["counts"], sys.stdout
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)  # noqa: E731
    print(f"golden set from {golden['reference']['model']} ({golden['reference']['settings']}), confident at "
          f"score >= {counts['confident_at']}:", file=out)
    for item in made["expected_outputs"]:
        confident = [name(c) for s, c in zip(item["scores"], item["class_ids"]) if s >= counts["confident_at"]]
        print(f"  {item['name']}: {len(item['scores'])} detection(s), {len(confident)} confident"
              + (f" ({', '.join(confident)})" if confident else ""), file=out)
    print(f"  {counts['confident_detections']} confident detections on {counts['images_with_detections']} of "
          f"{counts['images']} images, {len(counts['classes'])} classes", file=out)


def _reference(spec: str | None, repository: Path | None, detector: str | None, check_model: bool = True):
    from sidecar.golden import reference_from_repository, reference_from_spec

    if spec:
        return reference_from_spec(Path(spec))
    return reference_from_repository(repository, detector, check_model=check_model)


def bundle_expected(args: argparse.Namespace, json_file) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(expected outputs, golden record) for bundle create; GoldenSetError for a weak or unusable set."""
    from sidecar.errors import GoldenSetError
    from sidecar.golden import judge, make_golden_set, read_expected

    version_dir = Path(args.model_version_dir)
    repository, detector = version_dir.parent.parent, version_dir.parent.name
    if args.golden_images and args.expected_outputs:
        raise GoldenSetError("give --golden-images or --expected-outputs, not both")
    if args.golden_images:
        reference = _reference(args.golden_spec, repository, detector)
        made = make_golden_set(reference, args.golden_images, _criteria(args))
        _print_set(made, reference.pipeline.postprocess.classes)
        return made["expected_outputs"], made["golden"]
    if not args.expected_outputs:
        return [], None
    expected, golden = read_expected(json_file(args.expected_outputs, "expected outputs"), args.expected_outputs)
    if golden is not None:
        threshold = (golden.get("reference") or {}).get("score_threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise GoldenSetError(f"{args.expected_outputs}: its golden record names no reference score_threshold")
    else:
        try:
            threshold = _reference(args.golden_spec, repository, detector, check_model=False).score_threshold
        except GoldenSetError as exc:
            if args.golden_spec:
                raise
            threshold = None
            print(f"edgestack bundle create: warning: expected outputs not judged for strength ({exc})", file=sys.stderr)
    if threshold is not None:
        judge(expected, float(threshold), _criteria(args))
    return [dataclasses.asdict(e) for e in expected], golden


def cmd_bundle_golden(args: argparse.Namespace) -> int:
    from sidecar.golden import make_golden_set

    reference = _reference(args.spec, Path(args.repository) if args.repository else None, args.model)
    made = make_golden_set(reference, args.images, _criteria(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(made, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _print_set(made, reference.pipeline.postprocess.classes)
    print(f"written to {out} ({out.stat().st_size:,} bytes): bundle create --expected-outputs {out}")
    return 0


def add_golden_parser(bundle_sub) -> argparse.ArgumentParser:
    golden = bundle_sub.add_parser(
        "golden", help="make the expected outputs a bundle's health gate checks, with the reference FP32 pipeline",
        description="Run the source FP32 ONNX model in process (ONNX Runtime) with the server's own preprocess and "
                    "postprocess functions and the spec's (or the rendered repository's) settings on IMAGES, refuse a "
                    "set too weak for the gate to catch a wrong model, and write the detections with a record of "
                    "what made them (model sha256, runtime, settings, image names) for bundle create "
                    "--expected-outputs. Bundle metadata is at most 1 MiB: choose a few small images.")
    golden.add_argument("--images", nargs="+", required=True, metavar="PATH", help="images (files or folders)")
    source = golden.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", metavar="SPEC", help="the pipeline spec: source FP32 model and settings")
    source.add_argument("--repository", metavar="REPO", help="a rendered repository: its .pipeline.json's spec")
    golden.add_argument("--model", metavar="NAME", help="with --repository holding several pipelines: the detector "
                                                         "model, e.g. detect_detector")
    golden.add_argument("--out", required=True, metavar="FILE", help="golden file to write (JSON)")
    add_criteria_options(golden)
    golden.set_defaults(func=cmd_bundle_golden)
    return golden
