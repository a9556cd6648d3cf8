"""The cascade's decision, per image: keep a stage's answer when it is confident, else ask the next stage.

Plain functions (no Triton imports); backends/cascade/model.py calls the stages' models with BLS.
"""
from __future__ import annotations

from typing import Callable, Sequence

from backends.common.detections import Detections

# ask(stage_index, image_indices) -> (detections, statuses), one per given image
AskStage = Callable[[int, list[int]], tuple[list[Detections], list[str]]]


def run_cascade(count: int, stage_names: Sequence[str], min_confidence: float,
                ask: AskStage) -> tuple[list[Detections], list[str], list[str]]:
    """(detections, stage name, status) per image of a batch of count. The first stage sees every image; each later
    stage only the images the previous one answered below min_confidence; the last stage's answer is kept as it is.
    An image a stage could not use (its status is set) goes no further and its stage name is ""."""
    detections: list[Detections | None] = [None] * count
    stages = [""] * count
    statuses = [""] * count
    pending = list(range(count))
    for index, name in enumerate(stage_names):
        if not pending:
            break
        answers, answer_statuses = ask(index, pending)
        last = index == len(stage_names) - 1
        still = []
        for image, det, status in zip(pending, answers, answer_statuses):
            detections[image] = det
            if status:
                statuses[image], stages[image] = status, ""
            elif last or det.best_score >= min_confidence:
                stages[image] = name
            else:
                still.append(image)
        pending = still
    return detections, stages, statuses  # type: ignore[return-value]
