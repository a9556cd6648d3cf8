"""What the compression report's numbers are made of (builder/compress/pipeline.py): paired latency calls the teacher
and the candidate in alternation on the same tensors; settings name the bad field."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.compress import CompressError
from builder.compress.pipeline import CompressSettings, paired_latency


class Recorder:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def run_outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls.append((self.name, float(batch[0, 0, 0, 0])))
        return [batch]


def test_paired_latency_alternates_teacher_and_candidate_on_the_same_tensors():
    calls: list = []
    tensors = [np.full((4, 4, 3), i, dtype=np.float32) for i in range(3)]
    result = paired_latency(Recorder("teacher", calls), Recorder("candidate", calls), tensors, runs=6, warmup=2)
    measured = calls[4:]  # after 2 warm-up rounds of both
    assert len(measured) == 12
    rounds = [measured[i:i + 2] for i in range(0, 12, 2)]
    assert [r[0][0] for r in rounds] == ["teacher", "candidate"] * 3  # order swapped every round
    for i, pair in enumerate(rounds):
        assert {name for name, _ in pair} == {"teacher", "candidate"}
        assert {value for _, value in pair} == {float(i % 3)}  # both on the same image
    assert result["runs"] == 6
    assert result["speedup"] == pytest.approx(result["teacher_p50_ms"] / result["p50_ms"])


@pytest.mark.parametrize("field, value, message", [("ratios", (0.0,), "ratios"), ("ratios", (), "ratios"),
                                                   ("trainings", ("distil",), "unknown training"),
                                                   ("threads", 0, "threads")])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(CompressError, match=message):
        CompressSettings(out_dir=Path("out"), train_dirs=(Path("train"),), eval_dir=Path("eval"), **{field: value})
