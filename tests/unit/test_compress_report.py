"""The compression report (builder/compress/report.py): reductions, the three claims and the goal judged from rows,
and the Markdown/JSON/PNG it writes. Rows are synthetic measurements; each verdict is derived from them."""
from __future__ import annotations

import json

import pytest

from builder.compress import report


def row(name, ratio, training, precision, map50, *, params=1000, p50=30.0, speedup=1.0, macs=10_000, error=None):
    return {"name": name, "ratio": ratio, "training": training, "precision": precision, "map50": map50,
            "map50_95": map50 - 0.2 if map50 is not None else None, "parameters": params, "macs": macs,
            "file_bytes": params * 4, "p50_ms": p50, "teacher_p50_ms": 30.0, "speedup": speedup, "error": error,
            "train": {"steps": 10, "seconds": 5.0, "final_loss": 0.1, "stopped_by": "steps"}
            if training in ("plain", "distill") else None}


def full_rows(*, pruned=0.60, plain=0.80, distill=0.95, int8_drop=0.01, distill_speed=2.7, reduction=0.45):
    params = int(1000 * (1 - reduction))
    rows = [row("teacher-fp32", 0.0, "teacher", "fp32", 1.0),
            row("teacher-int8", 0.0, "teacher", "int8", 1.0 - int8_drop, speedup=1.6)]
    for training, fid in (("none", pruned), ("plain", plain), ("distill", distill)):
        for precision, value, speed in (("fp32", fid, 1.7), ("int8", fid - int8_drop, distill_speed)):
            rows.append(row(f"r50-{training}-{precision}", 0.5, training, precision, value, params=params, speedup=speed))
    return rows


def verdict(rows, index):
    return report.verdicts(report.add_reductions(rows))["claims"][index]


def test_reductions_are_against_the_fp32_teacher():
    rows = report.add_reductions(full_rows(reduction=0.45))
    student = next(r for r in rows if r["name"] == "r50-distill-fp32")
    assert student["param_reduction"] == pytest.approx(0.45)
    assert rows[0]["param_reduction"] == 0.0
    assert student["mac_reduction"] == 0.0


@pytest.mark.parametrize("distill, reduction, expected", [(0.995, 0.45, "holds"), (0.95, 0.45, "does not hold"),
                                                          (0.995, 0.30, "does not hold")])
def test_claim_pruning_needs_both_the_reduction_and_under_one_percent_loss(distill, reduction, expected):
    claim = verdict(full_rows(distill=distill, plain=0.5, reduction=reduction), 0)
    assert claim["verdict"] == expected
    assert any("r50-distill-fp32" in e for e in claim["evidence"])


@pytest.mark.parametrize("drop, expected", [(0.01, "holds"), (0.05, "does not hold")])
def test_claim_int8_compares_each_int8_row_with_its_fp32_counterpart(drop, expected):
    claim = verdict(full_rows(int8_drop=drop), 1)
    assert claim["verdict"] == expected
    assert len(claim["evidence"]) == 4  # the teacher and three students
    assert f"drop {100 * drop:.1f} points" in claim["evidence"][0]


def test_claim_int8_is_not_judged_on_students_that_lost_everything():
    rows = full_rows(pruned=0.0, int8_drop=0.0)
    next(r for r in rows if r["name"] == "r50-none-int8")["map50"] = 0.0
    claim = verdict(rows, 1)
    assert claim["verdict"] == "holds"
    assert any(e.startswith("r50-none-int8: not judged") for e in claim["evidence"])


def test_claim_int8_partly():
    rows = full_rows(int8_drop=0.01)
    next(r for r in rows if r["name"] == "r50-none-int8")["map50"] = 0.3
    assert verdict(rows, 1)["verdict"] == "holds for 3 of 4 variants"


@pytest.mark.parametrize("distill, expected", [(0.95, "holds"), (0.65, "does not hold")])
def test_claim_distillation_is_the_share_of_the_lost_fidelity_recovered(distill, expected):
    claim = verdict(full_rows(pruned=0.60, distill=distill, int8_drop=0.0), 2)
    assert claim["verdict"] == expected
    assert claim["recovered"] == pytest.approx((distill - 0.60) / 0.40)


def test_missing_rows_are_not_measured_rather_than_judged():
    rows = [row("teacher-fp32", 0.0, "teacher", "fp32", 1.0)]
    judged = report.verdicts(report.add_reductions(rows))
    assert [c["verdict"] for c in judged["claims"]] == ["not measured"] * 3
    assert judged["goal"]["met"] is False


@pytest.mark.parametrize("speed, distill, met", [(2.7, 0.95, True), (2.2, 0.95, False), (2.7, 0.85, False)])
def test_goal_needs_the_speedup_and_the_fidelity(speed, distill, met):
    judged = report.verdicts(report.add_reductions(full_rows(distill_speed=speed, distill=distill, int8_drop=0.0)))
    assert judged["goal"]["met"] is met
    assert judged["goal"]["row"] == "r50-distill-int8"


def test_write_report_writes_markdown_json_and_plot(tmp_path):
    rows = full_rows()
    rows.append(row("r70-distill-int8", 0.7, "distill", "int8", None, error="export failed: because"))
    out = report.write_report(rows, tmp_path, {"threads": 1, "reference_score_threshold": 0.35})
    md = out["paths"]["md"].read_text()
    assert "## The claims, row by row" in md and "r50-distill-int8" in md and "export failed: because" in md
    assert md.count("| **") >= 3  # a verdict per claim
    document = json.loads(out["paths"]["json"].read_text())
    assert len(document["variants"]) == len(rows) and len(document["claims"]) == 3
    assert out["paths"]["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
