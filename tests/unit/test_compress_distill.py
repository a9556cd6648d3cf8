"""Distillation trainer (builder/compress/distill.py) on tiny torch students and a fixed torch teacher: the losses,
the teacher's peaks, deterministic augmentation, exact resume from a checkpoint, and the evaluation-image guard."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from builder.compress import distill as d  # noqa: E402
from builder.compress.distill_losses import teacher_peaks  # noqa: E402
from builder.errors import BuilderError  # noqa: E402

SIZE = (32, 32)  # model input width, height; the heads are at stride 4


class TinyHeads(torch.nn.Module):
    """NHWC raw 0..255 -> (heatmap probabilities [B, 8, 8, C], size map [B, 8, 8, 4]) like the fixture's heads."""

    def __init__(self, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.heat = torch.nn.Conv2d(8, classes, 1)
        self.size = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        f = self.body(x.permute(0, 3, 1, 2) / 255.0)
        return torch.sigmoid(self.heat(f)).permute(0, 2, 3, 1), self.size(f).permute(0, 2, 3, 1)


def torch_teacher(seed: int = 7):
    model = TinyHeads(seed=seed).eval()

    def run(batch: np.ndarray):
        with torch.no_grad():
            heat, size = model(torch.from_numpy(batch))
        return heat.numpy(), size.numpy()

    return run


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        pixels = rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def settings(**kw) -> d.DistillSettings:
    base = dict(steps=6, batch_size=2, learning_rate=5e-3, checkpoint_every=2, seed=3)
    base.update(kw)
    return d.DistillSettings(**base)


def test_augmentation_is_deterministic_per_step_and_varies(images):
    data = d.AugmentedImages(d.training_images([images]), SIZE, settings())
    a, b, c = data.batch(4, 2), data.batch(4, 2), data.batch(5, 2)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 255.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("mode", d.MODES)
def test_training_lowers_the_loss_toward_the_teacher(images, mode):
    data = d.AugmentedImages(d.training_images([images]), SIZE, settings())
    s = settings(mode=mode, steps=40, score_threshold=0.5)
    result = d.distill(TinyHeads(seed=1), torch_teacher(), data, s, progress=False)
    assert result.steps == 40 and result.stopped_by == "steps" and len(result.losses) == 40
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8])


def test_distill_loss_is_minimal_at_the_teacher_and_scaled_by_t_squared():
    rng = np.random.default_rng(1)
    prob = torch.from_numpy(rng.uniform(0.01, 0.99, size=(1, 4, 4, 3)).astype(np.float32))
    size = torch.from_numpy(rng.normal(size=(1, 4, 4, 4)).astype(np.float32))
    logits = torch.logit(prob).clone().requires_grad_(True)
    student_size = size.clone().requires_grad_(True)
    loss, parts = d.distill_loss(logits, student_size, prob, size, temperature=3.0, size_weight=1.0)
    loss.backward()
    assert float(logits.grad.abs().max()) < 1e-6  # the soft targets are matched exactly
    assert parts["size"] == pytest.approx(0.0, abs=1e-7)
    moved = (torch.logit(prob) + 1.0)
    at_t1, _ = d.distill_loss(moved, size, prob, size, temperature=1.0, size_weight=0.0)
    at_t1_again, _ = d.distill_loss(torch.logit(prob), size, prob, size, temperature=1.0, size_weight=0.0)
    assert float(at_t1) > float(at_t1_again)


def test_foreground_weighting_makes_a_missed_object_count():
    teacher = torch.full((1, 16, 16, 2), 0.001)
    teacher[0, 5, 7, 1] = 0.9
    student = torch.logit(torch.full((1, 16, 16, 2), 0.001))  # right everywhere but at the object
    size = torch.zeros(1, 16, 16, 4)
    uniform, _ = d.distill_loss(student, size, teacher, size, 2.0, 0.0, heat_weighting="uniform")
    foreground, _ = d.distill_loss(student, size, teacher, size, 2.0, 0.0, heat_weighting="foreground")
    assert float(foreground) > 10 * float(uniform) > 0
    with pytest.raises(BuilderError, match="heat_weighting"):
        d.DistillSettings(heat_weighting="background")


def test_teacher_peaks_are_local_maxima_over_the_threshold():
    heat = torch.zeros(1, 6, 6, 2)
    heat[0, 2, 2, 0] = 0.8
    heat[0, 2, 3, 0] = 0.6  # beside a higher peak: not a peak
    heat[0, 5, 5, 1] = 0.2  # under the threshold
    heat[0, 0, 5, 1] = 0.5
    peaks = teacher_peaks(heat, 0.35)
    assert {tuple(i) for i in peaks.nonzero().tolist()} == {(0, 2, 2, 0), (0, 0, 5, 1)}


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(images, tmp_path):
    data = d.AugmentedImages(d.training_images([images]), SIZE, settings())
    whole = TinyHeads(seed=1)
    d.distill(whole, torch_teacher(), data, settings(steps=6), progress=False)

    ckpt = tmp_path / "student.ckpt"
    first = TinyHeads(seed=1)
    part = d.distill(first, torch_teacher(), data, settings(steps=6), checkpoint=ckpt, progress=False, stop_after=3)
    assert part.steps == 3 and part.stopped_by == "stop_after" and ckpt.is_file()
    resumed_model = TinyHeads(seed=5)  # other initial weights: the checkpoint must replace them
    resumed = d.distill(resumed_model, torch_teacher(), data, settings(steps=6), checkpoint=ckpt, progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 6 and len(resumed.losses) == 6
    for a, b in zip(whole.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_a_checkpoint_of_other_settings_is_refused(images, tmp_path):
    data = d.AugmentedImages(d.training_images([images]), SIZE, settings())
    ckpt = tmp_path / "student.ckpt"
    d.distill(TinyHeads(), torch_teacher(), data, settings(steps=2), checkpoint=ckpt, progress=False)
    with pytest.raises(BuilderError, match="other distillation settings"):
        d.distill(TinyHeads(), torch_teacher(), data, settings(steps=4, temperature=4.0), checkpoint=ckpt,
                  progress=False)


def test_learning_rate_warms_up_then_decays():
    s = settings(steps=100, learning_rate=1e-3)
    rates = [d.learning_rate_at(i, s) for i in range(100)]
    assert rates[0] < rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and rates[-1] < 0.1 * rates[9]


def test_time_bound_stops_training(images):
    data = d.AugmentedImages(d.training_images([images]), SIZE, settings())
    result = d.distill(TinyHeads(), torch_teacher(), data, settings(steps=1000, max_seconds=0.0), progress=False)
    assert result.stopped_by == "time" and result.steps == 0


def test_progress_bar_reports_steps_and_loss():
    stream = io.StringIO()
    bar = d.ProgressBar(4, "distill r50", stream=stream)
    bar.update(2, 0.5)
    bar.update(4, 0.25)
    text = stream.getvalue()
    assert "distill r50" in text and "4/4" in text and "loss 0.2500" in text and text.endswith("\n")


def test_an_evaluation_image_under_another_name_is_never_trained_on(images, tmp_path):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    shutil.copy(images / "img1.png", evaluation / "renamed.png")
    with pytest.raises(BuilderError, match="img1.png .= evaluation renamed.png"):
        d.check_disjoint(d.training_images([images]), d.training_images([evaluation]))
    d.check_disjoint(d.training_images([images])[:1], d.training_images([evaluation]))


def test_bad_settings_and_student_outputs_name_the_field(tmp_path):
    with pytest.raises(BuilderError, match="mode"):
        d.DistillSettings(mode="soft")
    with pytest.raises(BuilderError, match="temperature"):
        d.DistillSettings(temperature=0)
    with pytest.raises(BuilderError, match="heatmap"):
        d.StudentIO(heatmap="scores")
    with pytest.raises(BuilderError, match=r"\(heatmap, size_map\)"):
        d.student_heads(torch.zeros(1), d.StudentIO())
    with pytest.raises(BuilderError, match="has no images"):
        d.training_images([tmp_path])
