"""The student's heads and the two training losses of distillation (builder/compress/distill.py):

    distill_loss  soft heatmap KL at a temperature + confidence-weighted L1 on the size map (mode distill)
    plain_loss    CenterNet focal loss on the teacher's peaks + L1 size there (mode plain)

Tensors are torch, NHWC; torch is imported inside the functions, as everywhere in builder/compress.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from builder.errors import BuilderError

_EPS = 1e-6
HEAT_WEIGHTINGS = ("foreground", "uniform")
FOREGROUND_FLOOR = 0.01  # weight of a pixel neither model sees anything at, against up to 1 for an object's centre


@dataclass(frozen=True)
class StudentIO:
    """How the student's tensors are laid out: input NHWC|NCHW; outputs NHWC|NCHW; heatmap logits|probabilities."""

    input_layout: str = "NHWC"
    output_layout: str = "NHWC"
    heatmap: str = "probabilities"

    def __post_init__(self) -> None:
        for name in ("input_layout", "output_layout"):
            if getattr(self, name) not in ("NHWC", "NCHW"):
                raise BuilderError(f"StudentIO.{name} must be NHWC or NCHW, got {getattr(self, name)!r}")
        if self.heatmap not in ("logits", "probabilities"):
            raise BuilderError(f"StudentIO.heatmap must be logits or probabilities, got {self.heatmap!r}")

def _nhwc(tensor, layout: str):
    return tensor.permute(0, 2, 3, 1) if layout == "NCHW" else tensor


def student_heads(outputs: Any, io_spec: StudentIO):
    """(heatmap logits, size map), both NHWC, from the student's forward output."""
    import torch

    if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
        raise BuilderError(f"the student must return (heatmap, size_map), got {type(outputs).__name__}"
                           f"{'' if not isinstance(outputs, (tuple, list)) else f' of {len(outputs)}'}")
    heat, size = (_nhwc(t, io_spec.output_layout) for t in outputs)
    if io_spec.heatmap == "probabilities":
        heat = torch.logit(heat.clamp(_EPS, 1 - _EPS))
    return heat, size


def distill_loss(student_logits, student_size, teacher_prob, teacher_size, temperature: float, size_weight: float,
                 heat_weighting: str = "foreground"):
    """Soft heatmap KL (binary, per pixel and class) at temperature T (x T^2, summed over classes, averaged over pixels)
    + confidence-weighted L1 on the size map relative to its mean magnitude; returns (total, parts)."""
    import torch
    import torch.nn.functional as F

    t = float(temperature)
    teacher_logits = torch.logit(teacher_prob.clamp(_EPS, 1 - _EPS))
    soft = torch.sigmoid(teacher_logits / t)
    # KL divergence per pixel and class (BCE minus the soft targets' own entropy): 0 when the student is the teacher
    kl = (F.binary_cross_entropy_with_logits(student_logits / t, soft, reduction="none")
          - F.binary_cross_entropy_with_logits(teacher_logits / t, soft, reduction="none"))
    per_pixel = kl.sum(dim=-1)  # summed over classes
    if heat_weighting == "foreground":
        # where the teacher or the student sees an object: a few hundred of 16,384 pixels, drowned in a plain mean
        confident = torch.maximum(teacher_prob, torch.sigmoid(student_logits.detach())).amax(dim=-1)
        w = confident + FOREGROUND_FLOOR
        heat = (w * per_pixel).sum() / w.sum() * t * t
    else:
        heat = per_pixel.mean() * t * t
    weight = teacher_prob.amax(dim=-1, keepdim=True)
    size = (weight * (student_size - teacher_size).abs()).sum() / (weight.sum() * student_size.shape[-1] + _EPS)
    size = size / (teacher_size.abs().mean() + _EPS)  # relative to the map's scale (input pixels for the fixture)
    return heat + size_weight * size, {"heatmap": float(heat.detach()), "size": float(size.detach())}


def teacher_peaks(teacher_prob, threshold: float):
    """1.0 at the teacher's detections: 3x3 local maxima of the NHWC heatmap at or above threshold."""
    import torch.nn.functional as F

    nchw = teacher_prob.permute(0, 3, 1, 2)
    pooled = F.max_pool2d(nchw, 3, stride=1, padding=1)
    peaks = ((nchw == pooled) & (nchw >= threshold)).float()
    return peaks.permute(0, 2, 3, 1)


def plain_loss(student_logits, student_size, teacher_prob, teacher_size, threshold: float, size_weight: float):
    """CenterNet focal loss with the teacher's peaks as labels + L1 size at the peaks; returns (total, parts)."""
    import torch
    import torch.nn.functional as F

    peaks = teacher_peaks(teacher_prob, threshold)
    p = torch.sigmoid(student_logits).clamp(_EPS, 1 - _EPS)
    reduce = torch.where(peaks > 0, torch.zeros_like(teacher_prob), (1 - teacher_prob) ** 4)
    pos = -(peaks * (1 - p) ** 2 * F.logsigmoid(student_logits)).sum()
    neg = -(reduce * p ** 2 * F.logsigmoid(-student_logits)).sum()
    count = peaks.sum().clamp(min=1.0)
    heat = (pos + neg) / count
    at = peaks.amax(dim=-1, keepdim=True)
    size = (at * (student_size - teacher_size).abs()).sum() / (count * student_size.shape[-1])
    size = size / (teacher_size.abs().mean() + _EPS)
    return heat + size_weight * size, {"heatmap": float(heat.detach()), "size": float(size.detach())}
