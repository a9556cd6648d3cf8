"""The health gate before a commit, and probation after it.

Gate (candidate detector version loaded beside the previous one; the ensemble still runs the previous):
  1. warm-up      a few requests straight to the candidate version must succeed
  2. outputs      each expected image of the bundle goes through the SAME preprocess function the ensemble
                  runs (backends.preprocess.image_ops, settings from the repository's preprocess config),
                  the candidate version (all its outputs), and the same postprocess (backends.postprocess.pipeline,
                  settings from the repository's postprocess config); every
                  expected detection must be found with the same class, IoU >= iou_min and a score within
                  score_tolerance (detections within score_tolerance of the score threshold may come or go)
                  all images are checked: one HealthGateError lists every mismatch, by image index and name
  3. latency      the candidate against the previous version in interleaved rounds under the same load
                  (sidecar.latency): refused only when verified slower than latency_factor x the previous
                  version's time (+ latency_slack_ms); too noisy to tell raises GateInconclusiveError
Probation (the candidate serves): for a window, the candidate's statistics are polled; the failure ratio
and the compute time per inference (against the previous version's, taken at the gate) must stay within
the stage's bounds. Every failed check raises HealthGateError saying which and by how much.
"""
from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from backends.common import tensors as T
from backends.common.settings import PostprocessSettings, PreprocessSettings
from backends.errors import SettingsError
from sidecar.bundle_types import SCORE_TOLERANCE, ExpectedOutput
from sidecar.errors import HealthGateError, SidecarError, TritonControlError
from sidecar.latency import check_latency
from sidecar.triton_control import TritonControl, VersionStats


@dataclass(frozen=True)
class StageThresholds:
    name: str
    latency_factor: float  # gate: candidate <= factor x previous + slack (sidecar.latency)
    probation_max_fail_ratio: float  # failed / all inferences of the candidate during the window
    probation_latency_factor: float  # compute_infer per inference <= factor x the previous version's
    latency_slack_ms: float = 30.0
    iou_min: float = 0.9
    score_tolerance: float = SCORE_TOLERANCE
    warmup_requests: int = 2
    latency_min_rounds: int = 10  # the interval of the median needs n >= 10 at alpha 0.001
    latency_max_rounds: int = 40
    latency_alpha: float = 0.001  # error rate of a "too slow" verdict, which blocks the bundle
    latency_pass_alpha: float = 0.05  # of passing before latency_max_rounds (probation still watches)
    probation_min_inferences: int = 5  # fewer in the window: no latency verdict
    require_expected_outputs: bool = True


STAGES = {
    "canary": StageThresholds("canary", latency_factor=1.5, probation_max_fail_ratio=0.05, probation_latency_factor=2.0),
    "ga": StageThresholds("ga", latency_factor=1.3, probation_max_fail_ratio=0.01, probation_latency_factor=1.5),
}


def stage_thresholds(stage: str | StageThresholds) -> StageThresholds:
    if isinstance(stage, StageThresholds):
        return stage
    if stage not in STAGES:
        raise ValueError(f"unknown rollout stage {stage!r}; one of {sorted(STAGES)}")
    return STAGES[stage]


# --- the pipeline's own functions, in process -----------------------------------------------------------

class PipelineSteps:
    """preprocess(image bytes) -> (batch of 1, transform) and postprocess(detector outputs, transform) ->
    detections, with the settings of the ensemble's preprocess and postprocess steps as rendered in the
    repository. The detector outputs are TritonControl.infer_detector's (config order); postprocess hands them
    to the format in the order of its roles, as the ensemble wires them."""

    def __init__(self, control: TritonControl):
        ensemble = control.disk_config(control.ensemble_model)
        steps = ensemble.get("ensemble_scheduling", {}).get("step", [])
        detector = next((s for s in steps if s["model_name"] == control.detector_model), None)
        if detector is None:
            raise HealthGateError(f"{control.ensemble_model} has no {control.detector_model} step")
        feeds, reads = set(detector["input_map"].values()), set(detector["output_map"].values())
        pre = next((s["model_name"] for s in steps if feeds & set(s["output_map"].values())), None)
        post = next((s["model_name"] for s in steps if reads & set(s["input_map"].values())), None)
        if pre is None or post is None:
            raise HealthGateError(f"cannot find the steps around {control.detector_model} in {control.ensemble_model}")
        try:
            preprocess = PreprocessSettings.from_model_config(control.disk_config(pre), pre)
            self.postprocess_settings = PostprocessSettings.from_model_config(control.disk_config(post), post)
        except SettingsError as exc:
            raise HealthGateError(f"cannot reproduce the steps around {control.detector_model} in the gate: {exc}") from exc
        self.spec, self.limits = preprocess.input, preprocess.limits
        self.score_threshold = self.postprocess_settings.thresholds.score
        self.output_order = self._output_order(control, detector)

    def _output_order(self, control: TritonControl, detector_step: dict[str, Any]) -> list[int]:
        """For each role of the format, the index in the detector's config outputs of the tensor feeding it."""
        to_model = {tensor: model_output for model_output, tensor in detector_step["output_map"].items()}
        config_outputs = [o["name"] for o in control.disk_config(control.detector_model).get("output", [])]
        raw = T.raw_outputs(self.postprocess_settings.roles)
        if any(to_model.get(tensor) not in config_outputs for tensor in raw):
            raise HealthGateError(f"{control.ensemble_model} does not feed {', '.join(raw)} from outputs of "
                                  f"{control.detector_model} ({', '.join(config_outputs)})")
        return [config_outputs.index(to_model[tensor]) for tensor in raw]

    def preprocess(self, image: bytes):
        from backends.preprocess.image_ops import decode_image, prepare_input

        tensor, transform = prepare_input(decode_image(image, self.limits), self.spec)
        return tensor[np.newaxis], transform

    def postprocess(self, outputs: Sequence[np.ndarray], transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from backends.postprocess.pipeline import postprocess_image

        settings = self.postprocess_settings
        return postprocess_image([outputs[i][0] for i in self.output_order], settings.format, transform,
                                 **settings.options())


# --- comparisons ----------------------------------------------------------------------------------------

def iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_problems(expected: ExpectedOutput, boxes, scores, class_ids, *, iou_min: float,
                       score_tolerance: float, score_threshold: float) -> list[str]:
    """Every way the detections fail to reproduce `expected`; empty when they do."""
    actual = [(list(map(float, b)), float(s), int(c)) for b, s, c in zip(boxes, scores, class_ids)]
    borderline = score_threshold + score_tolerance  # below this a detection may drop out or appear
    used: set[int] = set()
    problems: list[str] = []
    order = sorted(range(len(expected.scores)), key=lambda i: -expected.scores[i])
    for i in order:
        box, score, cls = expected.boxes[i], float(expected.scores[i]), int(expected.class_ids[i])
        candidates = [(iou(box, a[0]), j) for j, a in enumerate(actual) if j not in used and a[2] == cls]
        best_iou, best = max(candidates, default=(0.0, None))
        if best is None or best_iou < iou_min:
            if score >= borderline:
                problems.append(f"expected class {cls} (score {score:.3f}) at {[round(v, 1) for v in box]} not "
                                f"reproduced: best IoU {best_iou:.3f} < {iou_min}")
            continue
        used.add(best)
        if abs(actual[best][1] - score) > score_tolerance:
            problems.append(f"class {cls} at {[round(v, 1) for v in box]}: score {actual[best][1]:.3f} differs from "
                            f"the expected {score:.3f} by more than {score_tolerance}")
    extra = [a for j, a in enumerate(actual) if j not in used and a[1] >= borderline]
    if extra:
        problems.append(f"{len(extra)} unexpected detection(s), e.g. class {extra[0][2]} (score {extra[0][1]:.3f}) "
                        f"at {[round(v, 1) for v in extra[0][0]]}")
    return problems


def compare_detections(expected: ExpectedOutput, boxes, scores, class_ids, *, iou_min: float,
                       score_tolerance: float, score_threshold: float) -> str | None:
    """None when the detections reproduce `expected`, else every difference, joined by '; '."""
    problems = detection_problems(expected, boxes, scores, class_ids, iou_min=iou_min,
                                  score_tolerance=score_tolerance, score_threshold=score_threshold)
    return "; ".join(problems) if problems else None


def _label(index: int, item: ExpectedOutput) -> str:
    return f"expected output {index}" + (f" ({item.name})" if item.name else "")


# --- gate -----------------------------------------------------------------------------------------------

def health_gate(control: TritonControl, candidate: int, previous: int, expected: Sequence[ExpectedOutput],
                thresholds: StageThresholds, steps: PipelineSteps | None = None,
                previous_since: VersionStats | None = None) -> dict[str, Any]:
    """Run warm-up, expected outputs and latency on `candidate`; the report, or HealthGateError.

    report["baseline"] is the previous version's statistics for probation: over the install (since
    `previous_since`, so under the traffic of now) when enough inferences ran, else since it was loaded."""
    steps = steps or PipelineSteps(control)
    if not expected and thresholds.require_expected_outputs:
        raise HealthGateError("the bundle carries no expected outputs: the gate cannot check what the model "
                              "detects (bundle create --golden-images, or --expected-outputs)")
    inputs, unusable = [], []
    for index, item in enumerate(expected):
        try:
            inputs.append(steps.preprocess(base64.b64decode(item.image_b64)))
        except Exception as exc:  # InvalidImageError and friends: the bundle's sample is unusable
            unusable.append(f"{_label(index, item)}: {exc}")
    if unusable:
        raise HealthGateError(f"{len(unusable)} expected-output image(s) do not preprocess: {'; '.join(unusable)}")
    probe = inputs[0][0] if inputs else _zeros(control)
    report: dict[str, Any] = {"stage": thresholds.name, "candidate": candidate, "previous": previous}
    for n in range(thresholds.warmup_requests):
        try:
            control.infer_detector(candidate, probe)
        except TritonControlError as exc:
            raise HealthGateError(f"warm-up request {n + 1} on v{candidate} failed: {exc}") from exc
    report["warmup_requests"] = thresholds.warmup_requests
    problems, first_failure = [], None
    for index, ((tensor, transform), item) in enumerate(zip(inputs, expected)):
        try:
            raw = control.infer_detector(candidate, tensor)
            got = steps.postprocess(raw, transform)
        except Exception as exc:  # SidecarError of the call, or postprocess refusing the output (shape, dtype)
            first_failure = first_failure or exc
            what = "failed" if isinstance(exc, SidecarError) else "gave an output that does not postprocess"
            problems.append(f"{_label(index, item)}: v{candidate} {what}: {exc}")
            continue
        problem = compare_detections(item, *got, iou_min=thresholds.iou_min, score_tolerance=thresholds.score_tolerance,
                                     score_threshold=steps.score_threshold)
        if problem:
            problems.append(f"{_label(index, item)} differs: {problem}")
    if problems:
        raise HealthGateError(f"v{candidate} does not reproduce {len(problems)} of {len(inputs)} expected outputs:\n  "
                              + "\n  ".join(problems)) from first_failure
    report["expected_outputs_checked"] = len(inputs)
    report["latency_ms"] = check_latency(control, candidate, previous, probe, thresholds)
    now = control.statistics(previous)
    recent = now.minus(previous_since) if previous_since is not None else None
    if recent is not None and min(recent.compute_infer_count, recent.inference_count) < 0:
        recent = None  # reloaded in between: its counters started again
    window = recent if recent is not None and recent.compute_infer_count >= thresholds.probation_min_inferences else now
    report["baseline"] = {**window.to_dict(), "window": "install" if window is recent else "since load"}
    return report


def _zeros(control: TritonControl) -> np.ndarray:
    config = control.disk_config(control.detector_model)
    tensor = config["input"][0]
    dtype = {"UINT8": np.uint8, "FP16": np.float16, "FP32": np.float32}.get(tensor["data_type"].removeprefix("TYPE_"))
    if dtype is None or any(int(d) < 1 for d in tensor["dims"]):
        raise HealthGateError("no expected outputs and no fixed input shape to warm the candidate up with")
    return np.zeros([1, *map(int, tensor["dims"])], dtype)


# --- probation ------------------------------------------------------------------------------------------

def check_window(delta: VersionStats, baseline: dict[str, Any] | None, thresholds: StageThresholds) -> str | None:
    """None when the candidate's statistics over the window so far are within the stage's bounds."""
    total = delta.success_count + delta.fail_count
    if delta.fail_count and delta.fail_count / total > thresholds.probation_max_fail_ratio:
        return (f"{delta.fail_count} of {total} inferences failed on v{delta.version} "
                f"(more than {thresholds.probation_max_fail_ratio:.0%}, stage {thresholds.name})")
    base = (baseline or {}).get("compute_infer_ns_per_inference")
    per = delta.compute_ns_per_inference
    if base and per is not None and delta.compute_infer_count >= thresholds.probation_min_inferences:
        if per > thresholds.probation_latency_factor * base:
            return (f"v{delta.version} computes {per / 1e6:.1f} ms per inference, over "
                    f"{thresholds.probation_latency_factor}x the previous version's {base / 1e6:.1f} ms "
                    f"(stage {thresholds.name})")
    return None


def probation(control: TritonControl, version: int, baseline: dict[str, Any] | None, thresholds: StageThresholds,
              window_s: float, poll_s: float = 0.5, abort: Callable[[], str | None] = lambda: None) -> dict[str, Any]:
    """Watch `version` for window_s seconds; the window's statistics, or HealthGateError (TritonControlError
    when the version is no longer loaded)."""
    try:
        start = control.statistics(version)
    except TritonControlError as exc:
        raise HealthGateError(f"probation: v{version} has no statistics: {exc}") from exc
    deadline = time.monotonic() + window_s
    while True:
        stop = abort()
        if stop:
            raise HealthGateError(f"probation of v{version} stopped: {stop}")
        if not control.is_ready(control.detector_model, version):
            raise TritonControlError(f"probation: v{version} is no longer ready")
        try:
            delta = control.statistics(version).minus(start)
        except TritonControlError as exc:
            raise HealthGateError(f"probation: statistics of v{version} unavailable: {exc}") from exc
        problem = check_window(delta, baseline, thresholds)
        if problem:
            raise HealthGateError(f"probation: {problem}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"window_s": window_s, **delta.to_dict(), "thresholds": asdict(thresholds)}
        time.sleep(min(poll_s, remaining))
