"""Golden sets: the expected outputs a bundle's health gate checks, made by the reference FP32 pipeline.

make_golden_set runs the source FP32 ONNX model in process with ONNX Runtime and exactly the functions the
server runs (backends.preprocess.image_ops decode_image + prepare_input, backends.postprocess.pipeline
postprocess_image), with the settings (backends.common.settings.PipelineSettings) the builder derives from a
spec file, or those recorded in the `<name>.pipeline.json` the repository was rendered with (its model_sha256
must still match the source model). The detections become the bundle's
expected_outputs; `golden` records what produced them (model sha256, runtime, settings, image names).

judge refuses a set the gate could not fail on, e.g. images on which FP32 finds nothing confident: a model
that detects nothing reproduces those. "Confident" is score >= threshold + margin, the margin being the
gate's score tolerance: below it the gate lets a detection come or go, so it checks nothing.

onnxruntime, PyYAML and the builder are imported only when a set is made: the device image stays light.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from backends.common import files
from backends.common.files import IMAGE_SUFFIXES, sha256_file
from backends.common.settings import PipelineSettings
from backends.errors import SettingsError
from sidecar.bundle_types import SCORE_TOLERANCE, ExpectedOutput, parse_expected_output
from sidecar.errors import GoldenSetError

PIPELINE_SUFFIX = ".pipeline.json"  # builder.repository.PIPELINE_FILE_SUFFIX


@dataclass(frozen=True)
class GoldenCriteria:
    """What a golden set needs so that a wrong model cannot pass the gate on it."""

    min_detections: int = 4  # confident detections over the whole set
    min_images: int = 2  # images with at least one confident detection
    min_classes: int = 2  # distinct classes among the confident detections
    margin: float = SCORE_TOLERANCE  # confident: score >= score threshold + margin

    def __post_init__(self) -> None:
        for name in ("min_detections", "min_images", "min_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GoldenSetError(f"golden criteria: {name} must be an integer >= 0, not {value!r}")
        if not 0 <= self.margin < 1:
            raise GoldenSetError(f"golden criteria: margin must be in [0, 1), not {self.margin!r}")


FLAGS = {"min_detections": "--golden-min-detections", "min_images": "--golden-min-images",
         "min_classes": "--golden-min-classes"}


def judge(expected: Sequence[ExpectedOutput], score_threshold: float,
          criteria: GoldenCriteria = GoldenCriteria()) -> dict[str, Any]:
    """The set's confident counts, or GoldenSetError naming every criterion it fails."""
    confident_at = score_threshold + criteria.margin
    per_image = [[c for s, c in zip(e.scores, e.class_ids) if s >= confident_at] for e in expected]
    counts = {"images": len(expected), "confident_detections": sum(map(len, per_image)),
              "images_with_detections": sum(1 for found in per_image if found),
              "classes": sorted({c for found in per_image for c in found}), "confident_at": round(confident_at, 6)}
    got = {"min_detections": counts["confident_detections"], "min_images": counts["images_with_detections"],
           "min_classes": len(counts["classes"])}
    what = {"min_detections": "confident detections", "min_images": "images with a confident detection",
            "min_classes": "distinct classes among them"}
    failed = [f"{got[k]} {what[k]}, at least {getattr(criteria, k)} needed ({FLAGS[k]})"
              for k in FLAGS if got[k] < getattr(criteria, k)]
    if failed:
        raise GoldenSetError(
            f"golden set too weak for the health gate (a model that detects nothing or the wrong thing could pass "
            f"it): on {len(expected)} image(s), {'; '.join(failed)}. Confident means score >= {confident_at:.3f} "
            f"(threshold {score_threshold} + the gate's tolerance {criteria.margin}); choose images on which the "
            "FP32 model finds several objects of several classes")
    return counts


# --- the reference: model and settings -----------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """The FP32 source model and the pipeline settings the golden set is made with."""

    model_path: Path
    pipeline: PipelineSettings
    settings: str  # where the settings come from, for the record

    @property
    def score_threshold(self) -> float:
        return self.pipeline.postprocess.thresholds.score


def reference_from_spec(path: Path) -> Reference:
    from builder.errors import SpecError
    from builder.settings import pipeline_settings
    from builder.spec import load_spec

    try:
        spec = load_spec(path)
    except SpecError as exc:
        raise GoldenSetError(f"golden spec {path}: {exc}") from exc
    return Reference(spec.model_path, pipeline_settings(spec), f"spec {path}")


def pipeline_records(repository: Path, detector_model: str | None = None) -> dict[Path, dict[str, Any]]:
    """The <name>.pipeline.json records of a rendered repository (only the one whose detector is detector_model,
    when given), by path; GoldenSetError (a BundleError) when one is unreadable."""
    records = {}
    for path in sorted(Path(repository).glob(f"*{PIPELINE_SUFFIX}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GoldenSetError(f"cannot read {path}: {exc}") from exc
        if detector_model is None or f"{record.get('spec', {}).get('name')}_detector" == detector_model:
            records[path] = record
    return records


def reference_from_repository(repository: Path, detector_model: str | None = None, *,
                              check_model: bool = True) -> Reference:
    """The settings the repository was rendered with: the .pipeline.json of the pipeline whose detector is
    detector_model (or the only one). With check_model, its source model must be the file it was rendered from."""
    repository = Path(repository)
    records = pipeline_records(repository, detector_model)
    if len(records) != 1:
        found = "no" if not records else f"{len(records)}"
        for_model = f" for {detector_model}" if detector_model else ""
        raise GoldenSetError(f"{found} *{PIPELINE_SUFFIX}{for_model} in {repository}: give the spec of the "
                             "reference (--golden-spec / --spec)")
    (path, record), = records.items()
    try:
        reference = Reference(Path(record["spec"]["model_path"]), PipelineSettings.from_dict(record["settings"], path.name),
                              f"repository {path}")
    except (KeyError, TypeError) as exc:
        raise GoldenSetError(f"{path} has no {exc} record: rendered by an older edgestack; render again, or give "
                             "--golden-spec") from exc
    except SettingsError as exc:
        raise GoldenSetError(f"{path}: {exc}") from exc
    if not check_model:
        return reference
    if not reference.model_path.is_file():
        raise GoldenSetError(f"{path}: source model {reference.model_path} is gone; give --golden-spec")
    if sha256_file(reference.model_path) != record.get("model_sha256"):
        raise GoldenSetError(f"{reference.model_path} changed since {repository} was rendered (sha256 differs from "
                             f"{path.name}'s): render again, or give --golden-spec")
    return reference


# --- making a set --------------------------------------------------------------------------------------

def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders as their image files sorted by name."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += files.image_files(path)
        elif path.is_file():
            found.append(path)
        else:
            raise GoldenSetError(f"golden image {path} does not exist")
    if not found:
        raise GoldenSetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, paths))}")
    return found


def run_reference(reference: Reference, images: Sequence[Path]) -> list[ExpectedOutput]:
    """The reference pipeline's final detections per image, as the server would answer them."""
    import numpy as np

    from backends.detector.onnx_runner import make_session
    from backends.postprocess.pipeline import postprocess_image
    from backends.preprocess.image_ops import decode_image, prepare_input

    try:
        session = make_session(str(reference.model_path), intra_op_threads=2)
    except Exception as exc:  # onnxruntime's load errors
        raise GoldenSetError(f"reference model {reference.model_path} ({reference.settings}): {exc}") from exc
    pipeline = reference.pipeline
    preprocess, postprocess = pipeline.preprocess, pipeline.postprocess
    out = []
    for path in images:
        data = Path(path).read_bytes()
        try:
            tensor, transform = prepare_input(decode_image(data, preprocess.limits), preprocess.input)
            outputs = session.run(list(pipeline.output_names), {pipeline.input_name: np.ascontiguousarray(tensor[None])})
            boxes, scores, class_ids = postprocess_image([o[0] for o in outputs], postprocess.format, transform,
                                                         **postprocess.options())
        except Exception as exc:  # InvalidImageError, onnxruntime's errors
            raise GoldenSetError(f"golden image {path}: the reference pipeline fails on it: {exc}") from exc
        out.append(ExpectedOutput(base64.b64encode(data).decode("ascii"), [[round(float(v), 3) for v in b] for b in boxes],
                                  [round(float(s), 5) for s in scores], [int(c) for c in class_ids], Path(path).name))
    return out


def make_golden_set(reference: Reference, images: Iterable[Path],
                    criteria: GoldenCriteria = GoldenCriteria()) -> dict[str, Any]:
    """{"golden": record, "expected_outputs": [...]}: the reference's detections on the images, judged.

    The record is what bundle create signs as the metadata's `golden`; the file `bundle golden` writes."""
    import onnxruntime

    from sidecar.bundle import MAX_METADATA_BYTES

    paths = image_files(images)
    encoded = sum((Path(p).stat().st_size + 2) // 3 * 4 for p in paths)
    if encoded > MAX_METADATA_BYTES:
        raise GoldenSetError(f"{len(paths)} golden images are {encoded:,} bytes in base64; a bundle's metadata "
                             f"is at most {MAX_METADATA_BYTES:,} bytes: choose fewer or smaller images")
    expected = run_reference(reference, paths)
    counts = judge(expected, reference.score_threshold, criteria)
    record = {
        "reference": {"model": reference.model_path.name, "model_sha256": sha256_file(reference.model_path),
                      "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
                      "settings": reference.settings, "score_threshold": reference.score_threshold},
        "images": [e.name for e in expected],
        "criteria": dataclasses.asdict(criteria),
        "counts": counts,
    }
    return {"golden": record, "expected_outputs": [dataclasses.asdict(e) for e in expected]}


def read_expected(data: Any, where: str) -> tuple[list[ExpectedOutput], dict[str, Any] | None]:
    """A JSON list of expected outputs (hand-written), or a golden file ({"golden", "expected_outputs"})."""
    golden = None
    if isinstance(data, Mapping):
        golden, data = data.get("golden"), data.get("expected_outputs")
        if not isinstance(golden, Mapping):
            raise GoldenSetError(f"{where}: a golden file needs a `golden` record (bundle golden writes one)")
    if not isinstance(data, list):
        raise GoldenSetError(f"{where}: expected outputs must be a JSON list or a golden file")
    return [parse_expected_output(item) for item in data], (dict(golden) if golden is not None else None)
