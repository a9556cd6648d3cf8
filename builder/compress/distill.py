"""Fine-tune a (pruned) student detector against the FP32 teacher: no labels, the teacher's outputs are the targets.

The teacher is the served ONNX detector run in ONNX Runtime on the very same augmented image the student sees;
its class heatmap (`tower_0/keypoints`, sigmoid probabilities, NHWC) and size/offset map (`tower_0/wh`) are the
targets. Two modes, same data, same steps, so the report can compare them:

- "distill": knowledge distillation. Heatmap: binary KL divergence (cross-entropy less the targets' entropy) of sigmoid(student_logit / T) from
  sigmoid(teacher_logit / T), times T^2 (Hinton's scaling), summed over classes, averaged over pixels weighted by
  how confident the teacher or the student is there ("foreground"; "uniform": a plain mean, which the background's
  16,000 pixels dominate: the student learns to see nothing); size map: L1
  weighted by the teacher's per-pixel class confidence (the size matters where there is an object), relative to
  the teacher map's mean magnitude.
- "plain": fine-tuning as one would with labels, the teacher's detections taken as the labels: CenterNet's
  penalty-reduced focal loss with 1 at the teacher's heatmap peaks (3x3 local maxima >= the score threshold) and
  L1 on the size map at those peaks only. No temperature, no dense soft targets.

The student contract (F1's builder/compress/torch_copy.py makes one): a torch.nn.Module whose forward takes the
detector's model input as a float32 tensor (StudentIO.input_layout, NHWC [B, 512, 512, 3] raw 0..255 for the
fixture) and returns (heatmap, size_map) as StudentIO says (layouts; heatmap as logits or as probabilities).

Data: unlabelled images (augmented: random crop of 35-100% of the area with aspect 3:4..4:3, horizontal flip,
colour jitter of brightness/contrast/saturation, then the spec's stretch resize, which rescales) and, optionally,
frames of a video. Evaluation images are never trained on: check_disjoint refuses a training set that shares a
file (by content hash) with them.

Optimiser: AdamW with a linear warm-up and a cosine decay over `steps` (learning_rate_at), the gradient's norm
clipped (a batch of unlucky crops does not throw the student off). Bounded: steps and
max_seconds (wall time of the training loop, one torch thread by default); a text progress
bar on stderr; a checkpoint (student, optimizer, step, loss history) every checkpoint_every steps and at the end,
from which a second call with the same settings resumes. The augmentation of step i depends only on (seed, i), so
a resumed run sees the same images as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from backends.common.files import image_folder, sha256_file
from builder.compress.distill_losses import HEAT_WEIGHTINGS, StudentIO, distill_loss, plain_loss, student_heads
from builder.errors import BuilderError

MODES = ("distill", "plain")


@dataclass(frozen=True)
class DistillSettings:
    mode: str = "distill"
    temperature: float = 2.0
    size_weight: float = 1.0
    steps: int = 300
    max_seconds: float | None = None
    batch_size: int = 2
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    heat_weighting: str = "foreground"  # distill: per-pixel weights of the heatmap KL (HEAT_WEIGHTINGS)
    clip_grad_norm: float | None = 1.0  # the gradient's global norm is clipped to this (None: not clipped)
    weight_decay: float = 0.0
    # L2-SP: + anchor * sum ||w - w_start||^2 / sum ||w_start||^2, pulling the student back to the weights it started
    # from: a few dozen training images cover few of the teacher's classes, and without it the student forgets the
    # others (the teacher says "no horse" on every training image).
    anchor: float = 0.0
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 25
    score_threshold: float = 0.35  # plain mode: teacher peaks at or above this are the labels
    min_crop_area: float = 0.35
    colour_jitter: float = 0.3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BuilderError(f"distillation mode must be one of {MODES}, got {self.mode!r}")
        if self.heat_weighting not in HEAT_WEIGHTINGS:
            raise BuilderError(f"heat_weighting must be one of {HEAT_WEIGHTINGS}, got {self.heat_weighting!r}")
        if not self.temperature > 0:
            raise BuilderError(f"temperature must be > 0, got {self.temperature}")
        for name in ("steps", "batch_size", "threads", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise BuilderError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise BuilderError(f"min_crop_area must be in (0, 1], got {self.min_crop_area}")

    def fingerprint(self) -> str:
        """What a checkpoint must match to be resumed (max_seconds may change between calls; steps may not: the
        learning-rate schedule depends on it)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("max_seconds", "checkpoint_every")}
        return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]


@dataclass
class DistillResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    stopped_by: str = "steps"  # steps | time | stop_after
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data ---------------------------------------------------------------------------------------


def training_images(folders: Sequence[Path]) -> list[Path]:
    """Every image file in the folders (sorted, not recursive); an error names a folder that has none."""
    images: list[Path] = []
    for folder in folders:
        images.extend(image_folder(Path(folder), BuilderError, "training images:"))
    return images


def check_disjoint(train: Sequence[Path], evaluation: Sequence[Path]) -> None:
    """Refuse training on an evaluation image: same content (sha256) or the same resolved path."""
    eval_hashes = {sha256_file(p): Path(p).name for p in evaluation}
    eval_paths = {Path(p).resolve() for p in evaluation}
    shared = [f"{Path(p).name} (= evaluation {eval_hashes.get(sha256_file(p), Path(p).name)})" for p in train
              if Path(p).resolve() in eval_paths or sha256_file(p) in eval_hashes]
    if shared:
        raise BuilderError(f"training images include evaluation images: {', '.join(shared)}; evaluation images are "
                           "never trained on")


def video_frames(video: Path, out_dir: Path, every: int = 40, limit: int = 20) -> list[Path]:
    """Every `every`-th frame of a video (at most `limit`) written as JPEG into out_dir: more unlabelled images."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise BuilderError(f"training video {video} cannot be read")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, index = [], 0
    try:
        while len(frames) < limit:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                path = out_dir / f"{Path(video).stem}_{index:05d}.jpg"
                cv2.imwrite(str(path), frame)
                frames.append(path)
            index += 1
    finally:
        capture.release()
    if not frames:
        raise BuilderError(f"training video {video} has no frame")
    return frames


class AugmentedImages:
    """Deterministic augmented model inputs: batch(step) depends only on (seed, step), so resuming is exact.

    Images are decoded once (RGB uint8). Each sample: random crop (area fraction in [min_crop_area, 1], aspect
    3:4..4:3), horizontal flip with p=0.5, colour jitter (brightness, contrast, saturation each by a factor in
    1 +- colour_jitter), stretch resize to (width, height): the fixture detector's preprocessing, raw 0..255.
    """

    def __init__(self, images: Sequence[Path], size: tuple[int, int], settings: DistillSettings) -> None:
        from PIL import Image, ImageOps

        if not images:
            raise BuilderError("no training images")
        self.size = size  # (width, height)
        self.settings = settings
        self.images = []
        for path in images:
            with Image.open(path) as img:
                self.images.append(ImageOps.exif_transpose(img).convert("RGB"))
        self.names = [Path(p).name for p in images]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image, ImageEnhance

        img = self.images[int(rng.integers(len(self.images)))]
        w, h = img.size
        area = rng.uniform(self.settings.min_crop_area, 1.0) * w * h
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        j = self.settings.colour_jitter
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            crop = enhancer(crop).enhance(float(rng.uniform(1 - j, 1 + j)))
        crop = crop.resize(self.size, Image.Resampling.BILINEAR)
        return np.asarray(crop, dtype=np.float32)

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """[batch_size, H, W, 3] float32 raw 0..255 for training step `step`."""
        rng = np.random.default_rng([self.settings.seed, step])
        return np.stack([self.sample(rng) for _ in range(batch_size)])


class OnnxTeacher:
    """The FP32 teacher in ONNX Runtime: (heatmap probabilities, size map), both NHWC, for an NHWC batch."""

    def __init__(self, model: Path, input_name: str, heatmap: str = "tower_0/keypoints", size_map: str = "tower_0/wh",
                 threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.input_name, self.outputs = input_name, [heatmap, size_map]
        names = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.outputs if n not in names]
        if missing:
            raise BuilderError(f"teacher {model} has no output(s) {missing}; it has {sorted(names)}")
        shape = self.session.get_inputs()[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fixed_batch == 1 and len(batch) > 1:
            parts = [self.session.run(self.outputs, {self.input_name: batch[i:i + 1]}) for i in range(len(batch))]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        heat, size = self.session.run(self.outputs, {self.input_name: batch})
        return heat, size


# --- training -----------------------------------------------------------------------------------


class ProgressBar:
    """A one-line text progress bar on a stream (stderr): step/total, loss, elapsed and remaining seconds."""

    def __init__(self, total: int, label: str, stream: Any = None, width: int = 24) -> None:
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()

    def update(self, done: int, loss: float) -> None:
        frac = min(1.0, done / max(1, self.total))
        elapsed = time.monotonic() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} loss {loss:.4f} "
                          f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left{end}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def learning_rate_at(step: int, settings: DistillSettings) -> float:
    """Linear warm-up over the first warmup_steps, then cosine decay to 5% at settings.steps (a function of the
    step alone, so a resumed run follows the same schedule)."""
    warmup = min(settings.warmup_steps, max(1, settings.steps // 5))
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, settings.steps - warmup))
    return settings.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * progress)))


def _save_checkpoint(path: Path, student, optimizer, step: int, losses: list[float], settings: DistillSettings) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                "fingerprint": settings.fingerprint()}, buffer)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # complete or absent


def distill(student, teacher: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], data: AugmentedImages,
            settings: DistillSettings, *, io_spec: StudentIO = StudentIO(), checkpoint: Path | None = None,
            progress: bool = True, label: str | None = None, stop_after: int | None = None) -> DistillResult:
    """Train `student` in place toward the teacher's outputs; resumes from `checkpoint` when it matches.

    Stops after settings.steps steps in all (resumed steps count), when this call has trained max_seconds, or after
    stop_after steps of this call (stopped_by "time" / "stop_after": a later call resumes from the checkpoint).
    A checkpoint written with other settings (mode, temperature, learning rate, seed...) is an error, not
    silently reused.
    """
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    start_weights = [p.detach().clone() for p in student.parameters()] if settings.anchor > 0 else []
    start_norm = sum(float((w * w).sum()) for w in start_weights) or 1.0
    start_step, losses = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
        if state.get("fingerprint") != settings.fingerprint():
            raise BuilderError(f"checkpoint {checkpoint} was written with other distillation settings; "
                               "remove it or use the same settings to resume")
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses = int(state["step"]), list(state["losses"])
    bar = ProgressBar(settings.steps, label or settings.mode) if progress else None
    student.train()
    started, step, stopped_by = time.monotonic(), start_step, "steps"
    while step < settings.steps:
        if settings.max_seconds is not None and time.monotonic() - started >= settings.max_seconds:
            stopped_by = "time"
            break
        if stop_after is not None and step - start_step >= stop_after:
            stopped_by = "stop_after"
            break
        batch = data.batch(step, settings.batch_size)
        teacher_heat, teacher_size = (torch.from_numpy(np.ascontiguousarray(a)) for a in teacher(batch))
        inputs = torch.from_numpy(batch)
        if io_spec.input_layout == "NCHW":
            inputs = inputs.permute(0, 3, 1, 2).contiguous()
        heat, size = student_heads(student(inputs), io_spec)
        if settings.mode == "distill":
            loss, _ = distill_loss(heat, size, teacher_heat, teacher_size, settings.temperature, settings.size_weight,
                                   settings.heat_weighting)
        else:
            loss, _ = plain_loss(heat, size, teacher_heat, teacher_size, settings.score_threshold, settings.size_weight)
        if start_weights:
            drift = sum(((p - w) ** 2).sum() for p, w in zip(student.parameters(), start_weights))
            loss = loss + settings.anchor * drift / start_norm
        if not torch.isfinite(loss):
            raise BuilderError(f"{settings.mode} step {step}: the loss is {float(loss)}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), settings.clip_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, settings)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(step, losses[-1])
        if checkpoint is not None and step % settings.checkpoint_every == 0:
            _save_checkpoint(Path(checkpoint), student, optimizer, step, losses, settings)
    if bar is not None and stopped_by != "steps":
        bar.close()
    if checkpoint is not None and step > start_step:
        _save_checkpoint(Path(checkpoint), student, optimizer, step, losses, settings)
    student.eval()
    return DistillResult(steps=step, seconds=time.monotonic() - started, losses=losses, resumed_from=start_step,
                         stopped_by=stopped_by, checkpoint=str(checkpoint) if checkpoint is not None else None)
