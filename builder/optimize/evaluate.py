"""Measure a model variant: its detections, fidelity to FP32, true mAP, latency and throughput (its size:
builder/optimize/variant_stats.py).

Detections come from exactly the functions the server runs (decode_image, prepare_input, the variant's
raw outputs, postprocess_image) with the settings the builder derives from the spec (builder.settings), so
what is measured here is what the ensemble would answer.

Accuracy uses pycocotools' COCOeval, never a hand-written mAP:
- fidelity_map: the candidate against the FP32 reference's own detections taken as pseudo ground truth
  (reference boxes with score >= the spec's threshold). 1.0 means "ranks and places boxes like FP32".
- labelled_map: the candidate against a real COCO-format labels file, when one is given.
Both evaluate the candidate's low-threshold detections (score_threshold 0.05 by default), since
average precision needs the ranking below the serving threshold.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.postprocess.pipeline import postprocess_image
from backends.preprocess.image_ops import decode_image, prepare_input
from builder.optimize.variants import VariantRunner
from builder.settings import pipeline_settings
from builder.spec import PipelineSpec

MAP_SCORE_THRESHOLD = 0.05  # keep the low-score tail: AP is computed over the ranking


@dataclass(frozen=True)
class ImageDetections:
    """One image's final detections: boxes float32 [K, 4] x1 y1 x2 y2 in original pixels, scores [K], class_ids [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    width: int
    height: int
    file_name: str = ""

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(class_ids):
            raise ValueError(f"ImageDetections: {len(boxes)} boxes, {len(scores)} scores, {len(class_ids)} class ids")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, threshold: float) -> "ImageDetections":
        """Only the detections with score >= threshold."""
        keep = self.scores >= threshold
        return ImageDetections(self.boxes[keep], self.scores[keep], self.class_ids[keep], self.width, self.height, self.file_name)


# --- detections ---------------------------------------------------------------------------------


def prepare_image(spec: PipelineSpec, path: Path) -> tuple[np.ndarray, Any, int, int]:
    """(tensor without batch dim, Transform, width, height) of one image, as the server's preprocess makes them."""
    settings = pipeline_settings(spec).preprocess
    rgb = decode_image(Path(path).read_bytes(), settings.limits)
    tensor, transform = prepare_input(rgb, settings.input)
    return np.ascontiguousarray(tensor), transform, int(rgb.shape[1]), int(rgb.shape[0])


def prepare_images(spec: PipelineSpec, images: Sequence[Path]) -> list[tuple[np.ndarray, Any, int, int]]:
    """prepare_image for each image; the tensors are what measure_latency / measure_throughput take."""
    return [prepare_image(spec, path) for path in images]


def detect_images(runner: VariantRunner, spec: PipelineSpec, images: Sequence[Path], *,
                  score_threshold: float = MAP_SCORE_THRESHOLD) -> list[ImageDetections]:
    """The variant's detections per image, one image per run (batch 1), with the spec's NMS and max_detections.

    score_threshold replaces the spec's (low by default, for mAP); filter with ImageDetections.above()
    to get what the server would answer.
    """
    settings = pipeline_settings(spec).postprocess
    out = []
    for path in images:
        tensor, transform, width, height = prepare_image(spec, path)
        outputs = runner.run_outputs(tensor[None])
        boxes, scores, class_ids = postprocess_image([np.asarray(o)[0] for o in outputs], settings.format, transform,
                                                     **settings.options(score_threshold))
        out.append(ImageDetections(boxes, scores, class_ids, width, height, Path(path).name))
    return out


# --- accuracy (pycocotools) ---------------------------------------------------------------------


def _xywh(box: np.ndarray) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _quiet(fn, *args, **kwargs):
    """pycocotools prints progress to stdout; keep it out of the CLI's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _coco_from_dict(dataset: dict) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    _quiet(coco.createIndex)
    return coco


def _evaluate(gt: Any, dets: list[dict], img_ids: list[int]) -> dict[str, Any]:
    """COCOeval bbox on img_ids; categories without ground truth and their detections are ignored by COCOeval."""
    from pycocotools.cocoeval import COCOeval

    wanted = set(img_ids)
    num_gt = sum(1 for a in gt.dataset["annotations"] if a["image_id"] in wanted and not a.get("iscrowd", 0))
    result: dict[str, Any] = {"images": len(img_ids), "gt_boxes": num_gt, "detections": len(dets), "note": None}
    if num_gt == 0:
        result.update(map50=math.nan, map50_95=math.nan, categories=0,
                      note="no ground-truth boxes: mAP is undefined (COCOeval gives -1)")
        return result
    gt_cats = {a["category_id"] for a in gt.dataset["annotations"] if a["image_id"] in wanted}
    result["categories"] = len(gt_cats)
    if not dets:  # loadRes cannot take an empty list; no detection at all means AP 0 for every class
        result.update(map50=0.0, map50_95=0.0, note="the candidate has no detections")
        return result
    dt = _quiet(gt.loadRes, dets)
    ev = COCOeval(gt, dt, iouType="bbox")
    ev.params.imgIds = sorted(img_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    # stats[0]: AP@[.5:.95] all areas, 100 dets; stats[1]: AP@.5. -1 means nothing to evaluate.
    map50_95, map50 = float(ev.stats[0]), float(ev.stats[1])
    result["map50"] = map50 if map50 >= 0 else math.nan
    result["map50_95"] = map50_95 if map50_95 >= 0 else math.nan
    return result


def _det_records(candidate: Sequence[ImageDetections], image_ids: Sequence[int | None],
                 category_of: dict[int, int] | None = None) -> tuple[list[dict], int]:
    """COCO result records; returns them and the number dropped (image or class not in the ground truth)."""
    dets, dropped = [], 0
    for image_id, det in zip(image_ids, candidate):
        for box, score, cls in zip(det.boxes, det.scores, det.class_ids):
            cat = int(cls) + 1 if category_of is None else category_of.get(int(cls))
            if image_id is None or cat is None:
                dropped += 1
                continue
            dets.append({"image_id": int(image_id), "category_id": int(cat), "bbox": _xywh(box), "score": float(score)})
    return dets, dropped


def fidelity_map(reference: Sequence[ImageDetections], candidate: Sequence[ImageDetections], *,
                 reference_score_threshold: float) -> dict[str, Any]:
    """mAP@0.5 and mAP@0.5:0.95 of candidate against reference's detections with score >= threshold as ground truth.

    The lists are aligned by position (same images, same order). Returns map50, map50_95 (NaN when the
    reference has no box above the threshold, with a note), images, gt_boxes, detections, categories, note.
    Images without pseudo ground truth stay in the evaluation (their detections count as false positives
    for classes that have ground truth elsewhere); classes without ground truth are ignored, as COCOeval does.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"fidelity_map: {len(reference)} reference images but {len(candidate)} candidate images")
    images, annotations, class_ids = [], [], set()
    for i, (ref, cand) in enumerate(zip(reference, candidate), start=1):
        if (ref.width, ref.height) != (cand.width, cand.height):
            raise ValueError(f"fidelity_map: image {i} is {ref.width}x{ref.height} in the reference, "
                             f"{cand.width}x{cand.height} in the candidate")
        images.append({"id": i, "width": ref.width, "height": ref.height, "file_name": ref.file_name or str(i)})
        gt = ref.above(reference_score_threshold)
        for box, cls in zip(gt.boxes, gt.class_ids):
            x, y, w, h = _xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cls) + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        class_ids.update(int(c) for c in ref.class_ids)
        class_ids.update(int(c) for c in cand.class_ids)
    categories = [{"id": c + 1, "name": str(c)} for c in sorted(class_ids)]
    gt_coco = _coco_from_dict({"images": images, "annotations": annotations, "categories": categories})
    dets, _ = _det_records(candidate, [img["id"] for img in images])
    result = _evaluate(gt_coco, dets, [img["id"] for img in images])
    result["reference_score_threshold"] = float(reference_score_threshold)
    return result


def labelled_map(coco_json: Path, candidate: Sequence[ImageDetections], file_names: Sequence[str],
                 class_names: Sequence[str]) -> dict[str, Any]:
    """True mAP of candidate against a COCO-format labels file.

    Images are matched by file_name (exact, then by base name); classes by name (class_names[class_id]
    against the file's category names). Only the matched images are evaluated; candidate images missing
    from the labels file and detections of classes it does not name are counted and left out.
    """
    if len(candidate) != len(file_names):
        raise ValueError(f"labelled_map: {len(candidate)} detection sets but {len(file_names)} file names")
    dataset = json.loads(Path(coco_json).read_text())
    for key in ("images", "annotations", "categories"):
        dataset.setdefault(key, [])
    gt = _coco_from_dict(dataset)
    by_name: dict[str, int] = {}
    by_base: dict[str, int] = {}
    for img in dataset["images"]:
        by_name[str(img["file_name"])] = img["id"]
        by_base.setdefault(Path(str(img["file_name"])).name, img["id"])
    image_ids = [by_name.get(n, by_base.get(Path(n).name)) for n in file_names]
    cat_by_name = {str(c["name"]): c["id"] for c in dataset["categories"]}
    category_of = {i: cat_by_name[n] for i, n in enumerate(class_names) if n in cat_by_name}
    dets, dropped = _det_records(candidate, image_ids, category_of)
    matched = sorted({i for i in image_ids if i is not None})
    result = _evaluate(gt, dets, matched)
    unmatched = [n for n, i in zip(file_names, image_ids) if i is None]
    result.update(labels=str(coco_json), unmatched_images=unmatched, dropped_detections=dropped,
                  unmatched_classes=sorted(set(class_names) - set(cat_by_name)))
    if not matched:
        result["note"] = f"none of the {len(file_names)} images is in {coco_json}"
    return result


# --- speed --------------------------------------------------------------------------------------


def _batch_of_one(tensor: np.ndarray) -> np.ndarray:
    """Accept one image's tensor with or without the leading batch dimension of 1."""
    tensor = np.asarray(tensor)
    if tensor.ndim == 3:
        return np.ascontiguousarray(tensor[None])
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        return np.ascontiguousarray(tensor)
    raise ValueError(f"expected one image's tensor ([...] or [1, ...]), got shape {tensor.shape}")


def measure_latency(runner: VariantRunner, tensors: Sequence[np.ndarray], runs: int = 50, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 latency of runner.run_outputs over `runs` calls (cycling through tensors) after `warmup` calls."""
    if not tensors:
        raise ValueError("measure_latency needs at least one tensor")
    if runs < 1 or warmup < 0:
        raise ValueError(f"measure_latency needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    batches = [_batch_of_one(t) for t in tensors]
    for i in range(warmup):
        runner.run_outputs(batches[i % len(batches)])
    times = np.empty(runs)
    for i in range(runs):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        runner.run_outputs(batch)
        times[i] = time.perf_counter() - start
    times *= 1000.0
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(times.mean()), "runs": runs, "warmup": warmup}


def runner_fixed_batch(runner: Any) -> int | None:
    """The batch size the runner's graph is fixed at, if it says so (a .fixed_batch attribute, or an ORT session's input)."""
    fixed = getattr(runner, "fixed_batch", None)
    if isinstance(fixed, int) and fixed > 0:
        return fixed
    session = getattr(runner, "session", None)
    if session is not None and hasattr(session, "get_inputs"):
        try:
            dim = session.get_inputs()[0].shape[0]
        except Exception:  # noqa: BLE001 - not an ORT session after all
            return None
        return dim if isinstance(dim, int) and dim > 0 else None
    return None


def measure_throughput(runner: VariantRunner, tensors: Sequence[np.ndarray], batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
                       seconds: float = 2.0, *, fixed_batch: int | None = None) -> dict[str, Any]:
    """Images per second at each batch size, each run for about `seconds` after one warm-up call.

    fixed_batch (or, when None, what runner_fixed_batch finds) restricts the sizes to that one: a graph
    fixed at batch 1 can only be measured at batch 1, and the result's note says so. A batch size whose
    run fails is reported under "failed" and skipped.
    """
    if not tensors:
        raise ValueError("measure_throughput needs at least one tensor")
    fixed = fixed_batch if fixed_batch is not None else runner_fixed_batch(runner)
    sizes = sorted({int(b) for b in batch_sizes if int(b) > 0})
    note = None
    if fixed is not None:
        skipped = [b for b in sizes if b != fixed]
        sizes = [fixed]
        note = f"graph fixed at batch {fixed}: only batch {fixed} measured" + (f" (skipped {skipped})" if skipped else "")
    items = [_batch_of_one(t) for t in tensors]
    per_batch: dict[int, float] = {}
    failed: dict[int, str] = {}
    for size in sizes:
        batch = np.ascontiguousarray(np.concatenate([items[i % len(items)] for i in range(size)]))
        try:
            runner.run_outputs(batch)  # warm-up; also proves the size runs at all
            count, start = 0, time.perf_counter()
            while True:
                runner.run_outputs(batch)
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds and count >= 2:
                    break
        except Exception as exc:  # noqa: BLE001 - a size the variant cannot run is a result, not a crash
            failed[size] = f"{type(exc).__name__}: {exc}"
            continue
        per_batch[size] = count * size / elapsed
    best = max(per_batch, key=lambda b: (per_batch[b], -b)) if per_batch else None
    return {"best_batch": best, "images_per_s": per_batch.get(best) if best is not None else None,
            "per_batch": per_batch, "failed": failed, "fixed_batch": fixed, "note": note, "seconds": seconds}
