"""The keep rule's math: class scores from candidates on the same object, probabilities, entropy, margin."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loop.errors import SamplingError
from loop.settings import SamplingSettings
from loop.uncertainty import assess, class_scores, entropy_bits, margin, pairwise_iou, probabilities

BOX = np.array([[10, 10, 50, 50]], np.float32)


def test_iou_of_same_disjoint_and_half_overlapping_boxes():
    iou = pairwise_iou(BOX, np.array([[10, 10, 50, 50], [60, 60, 70, 70], [30, 10, 70, 50]], np.float32))
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == 0.0
    assert iou[0, 2] == pytest.approx(800 / 2400)


def test_candidates_on_the_same_object_vote_their_class_best_score_wins():
    cand_boxes = np.array([[11, 10, 50, 51], [10, 10, 49, 50], [12, 12, 50, 50], [200, 200, 240, 240]], np.float32)
    scores = class_scores(BOX, np.array([0.6]), np.array([0]), cand_boxes, np.array([0.3, 0.2, 0.25, 0.9]),
                          np.array([1, 2, 1, 3]), num_classes=4, same_object_iou=0.6)
    np.testing.assert_allclose(scores, [[0.6, 0.3, 0.2, 0.0]], rtol=1e-6)  # class 3 is another object


def test_entropy_and_margin_of_known_distributions():
    p = probabilities(np.array([[1.0, 0, 0], [0.5, 0.5, 0], [1, 1, 1]]))
    np.testing.assert_allclose(entropy_bits(p), [0.0, 1.0, math.log2(3)], atol=1e-9)
    np.testing.assert_allclose(margin(p), [1.0, 0.0, 0.0], atol=1e-9)
    assert probabilities(np.zeros((1, 3))).sum() == 0.0


def test_keep_rule_entropy_band_and_confident():
    names = ("cat", "dog")
    confused = assess([0.8], np.array([[0.8, 0.7]]), entropy_threshold=0.9, unsure_low=0.35, unsure_high=0.5,
                      class_names=names)
    assert confused.keep and "entropy" in confused.reason and "cat/dog" in confused.reason
    unsure = assess([0.4], np.array([[0.4, 0.0]]), entropy_threshold=0.9, unsure_low=0.35, unsure_high=0.5)
    assert unsure.keep and "unsure band" in unsure.reason
    sure = assess([0.9], np.array([[0.9, 0.05]]), entropy_threshold=0.9, unsure_low=0.35, unsure_high=0.5)
    assert not sure.keep and sure.max_entropy < 0.9
    empty = assess([], np.zeros((0, 2)), entropy_threshold=0.9, unsure_low=0.35, unsure_high=0.5)
    assert not empty.keep and empty.best_score is None


@pytest.mark.parametrize("field, value", [("entropy_bits", -1), ("unsure_low", 1.5), ("burst", 0),
                                          ("device_id", "a b"), ("max_bytes", True), ("rate_per_s", 0)])
def test_bad_sampling_setting_is_named(field, value):
    with pytest.raises(SamplingError, match=f"sampling.{field}"):
        SamplingSettings(**{field: value})


def test_unknown_sampling_field_is_named():
    with pytest.raises(SamplingError, match="unknown field.*'rate'"):
        SamplingSettings.from_dict({"rate": 3})
    with pytest.raises(SamplingError, match="unsure_high"):
        SamplingSettings.from_dict({"unsure_low": 0.6, "unsure_high": 0.5})


def test_spec_sampling_section_loads_and_names_bad_fields(tmp_path):
    from builder.spec import load_spec
    from loop.pipeline_step import load_sampling
    from tests.conftest import ROOT

    spec = ROOT / "specs" / "centernet_sampling.yaml"
    assert load_spec(spec).name == "detect"  # the builder accepts (and ignores) the section
    settings = load_sampling(spec)
    assert settings.enabled and settings.spool_dir == str((ROOT / "out" / "spool").resolve())
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("entropy_bits: 0.9", "entropy_bits: lots"))
    with pytest.raises(SamplingError, match="sampling.entropy_bits"):
        load_sampling(bad)
