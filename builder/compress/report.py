"""The compression report: report.json, report.md and fidelity_vs_latency.png, with a verdict on the issue's claims.

A row is a flat dict per variant (pipeline.py builds them):
  name, ratio (fraction of prunable channels removed; 0 for the teacher), training (none|plain|distill|teacher),
  precision (fp32|int8), parameters, file_bytes, macs (of the trainable part, per image),
  p50_ms, teacher_p50_ms, speedup (teacher p50 / variant p50, paired in the same run),
  map50, map50_95 (fidelity against the FP32 teacher's detections, pycocotools), fidelity_note,
  train (steps, seconds, final_loss, stopped_by), path (the variant folder), error.
Missing values are None.

The claims (issue #15), each judged row by row from the measurements, whatever they turn out to be:
1. pruning + fine-tuning: 40-50% fewer parameters with < 1% accuracy loss (fidelity mAP@0.5 >= 0.99);
2. INT8 costs 0.5-1.5% (fidelity mAP@0.5 drop of an INT8 variant against its FP32 counterpart <= 0.015; judged
   only where the FP32 counterpart keeps a fidelity >= 0.5);
3. distillation recovers most (>= half) of the loss of aggressive pruning (the highest ratio) plus INT8.
The goal: a pruned, distilled INT8 student at >= 2.5x the teacher's FP32 speed with fidelity mAP@0.5 >= 0.90.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.optimize.manifest import to_json
from builder.optimize.select import _number

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "fidelity_vs_latency.png"

CLAIM1_REDUCTION = (0.40, 0.50)
CLAIM1_MAX_LOSS = 0.01
CLAIM2_MAX_DROP = 0.015
CLAIM2_MIN_FP32 = 0.5  # an INT8 row whose FP32 counterpart is under this is not evidence either way
CLAIM3_RECOVERED = 0.5
GOAL_SPEEDUP = 2.5
GOAL_FIDELITY = 0.90
TRAININGS = ("none", "plain", "distill")


def _f(value: Any, digits: int = 3) -> str:
    v = _number(value)
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(value: Any) -> str:
    v = _number(value)
    return "–" if v is None else f"{100 * v:.0f}%"


def _rows_by(rows: list[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and not r.get("error")]


def _teacher(rows: list[dict], precision: str = "fp32") -> dict | None:
    found = _rows_by(rows, training="teacher", precision=precision)
    return found[0] if found else None


def add_reductions(rows: list[dict]) -> list[dict]:
    """param_reduction and macs_reduction (1 - variant / teacher FP32) on every row; returns rows."""
    teacher = _teacher(rows)
    for row in rows:
        for key, out in (("parameters", "param_reduction"), ("macs", "mac_reduction")):
            base = _number(teacher.get(key)) if teacher else None
            value = _number(row.get(key))
            row[out] = None if not base or value is None else 1.0 - value / base
    return rows


def _counterpart(rows: list[dict], row: dict, precision: str) -> dict | None:
    found = _rows_by(rows, ratio=row.get("ratio"), training=row.get("training"), precision=precision)
    return found[0] if found else None


def claim_pruning(rows: list[dict]) -> dict[str, Any]:
    """Claim 1, judged on every fine-tuned FP32 student: reduction of parameters and loss of fidelity mAP@0.5."""
    lo, hi = CLAIM1_REDUCTION
    evidence, holds = [], []
    for row in rows:
        if row.get("training") not in ("plain", "distill") or row.get("precision") != "fp32" or row.get("error"):
            continue
        reduction, fid = _number(row.get("param_reduction")), _number(row.get("map50"))
        if reduction is None or fid is None:
            continue
        ok = reduction >= lo and 1.0 - fid < CLAIM1_MAX_LOSS
        holds.append(ok)
        evidence.append(f"{row['name']}: {_pct(reduction)} fewer parameters, fidelity mAP@0.5 {fid:.3f} "
                        f"(loss {100 * (1 - fid):.1f}%){' - meets it' if ok else ''}")
    if not evidence:
        verdict = "not measured"
    elif any(holds):
        verdict = "holds"
    else:
        verdict = "does not hold"
    return {"claim": f"pruning + fine-tuning: {int(lo * 100)}-{int(hi * 100)}% parameter reduction with "
                     f"<{int(CLAIM1_MAX_LOSS * 100)}% accuracy loss", "verdict": verdict, "evidence": evidence}


def claim_int8(rows: list[dict]) -> dict[str, Any]:
    """Claim 2: the fidelity mAP@0.5 drop of each INT8 variant against its FP32 counterpart."""
    evidence, within = [], []
    for row in rows:
        if row.get("precision") != "int8" or row.get("error"):
            continue
        base = _counterpart(rows, row, "fp32")
        fid, ref = _number(row.get("map50")), _number(base.get("map50")) if base else None
        if fid is None or ref is None:
            continue
        if ref < CLAIM2_MIN_FP32:
            evidence.append(f"{row['name']}: not judged, its FP32 counterpart's fidelity is {ref:.3f} "
                            f"(under {CLAIM2_MIN_FP32}: nothing left for INT8 to lose)")
            continue
        drop = ref - fid
        within.append(drop <= CLAIM2_MAX_DROP)
        evidence.append(f"{row['name']}: {ref:.3f} -> {fid:.3f} (drop {100 * drop:.1f} points)")
    if not within:
        verdict = "not measured"
    elif all(within):
        verdict = "holds"
    elif any(within):
        verdict = f"holds for {sum(within)} of {len(within)} variants"
    else:
        verdict = "does not hold"
    return {"claim": "INT8 costs 0.5-1.5% accuracy", "verdict": verdict, "evidence": evidence}


def claim_distillation(rows: list[dict]) -> dict[str, Any]:
    """Claim 3 at the highest ratio measured: (loss without fine-tuning - loss distilled) / loss without, INT8."""
    ratios = sorted({r.get("ratio") for r in rows if r.get("training") in TRAININGS and _number(r.get("ratio"))})
    claim = "distillation recovers most of the loss of aggressive pruning plus INT8"
    if not ratios:
        return {"claim": claim, "verdict": "not measured", "evidence": []}
    ratio = ratios[-1]
    found = {t: _rows_by(rows, ratio=ratio, training=t, precision="int8") for t in TRAININGS}
    fids = {t: _number(v[0].get("map50")) if v else None for t, v in found.items()}
    if fids["none"] is None or fids["distill"] is None:
        return {"claim": claim, "verdict": "not measured", "evidence": [f"ratio {ratio}: missing INT8 rows"]}
    lost = 1.0 - fids["none"]
    evidence = [f"ratio {_pct(ratio)} + INT8: no fine-tuning {fids['none']:.3f}, distilled {fids['distill']:.3f}"
                + (f", plain fine-tuning {fids['plain']:.3f}" if fids["plain"] is not None else "")]
    if lost <= 0:
        return {"claim": claim, "verdict": "not measurable (pruning lost nothing)", "evidence": evidence}
    recovered = (fids["distill"] - fids["none"]) / lost
    evidence.append(f"distillation recovered {100 * recovered:.0f}% of the {100 * lost:.1f} points lost")
    if fids["plain"] is not None:
        evidence.append(f"plain fine-tuning recovered {100 * (fids['plain'] - fids['none']) / lost:.0f}%")
    return {"claim": claim, "verdict": "holds" if recovered >= CLAIM3_RECOVERED else "does not hold",
            "evidence": evidence, "recovered": recovered}


def goal(rows: list[dict]) -> dict[str, Any]:
    """The best distilled INT8 student: the fastest that meets the fidelity, else the most faithful."""
    candidates = [r for r in _rows_by(rows, training="distill", precision="int8")
                  if _number(r.get("speedup")) is not None and _number(r.get("map50")) is not None]
    text = f"a pruned, distilled INT8 student at >= {GOAL_SPEEDUP}x the teacher's FP32 speed with fidelity " \
           f"mAP@0.5 >= {GOAL_FIDELITY}"
    if not candidates:
        return {"goal": text, "met": False, "row": None, "evidence": "no distilled INT8 student was measured"}
    meeting = [r for r in candidates if r["speedup"] >= GOAL_SPEEDUP and r["map50"] >= GOAL_FIDELITY]
    best = max(meeting, key=lambda r: r["speedup"]) if meeting else max(candidates, key=lambda r: r["map50"])
    return {"goal": text, "met": bool(meeting), "row": best["name"],
            "evidence": f"{best['name']}: {best['speedup']:.2f}x, fidelity mAP@0.5 {best['map50']:.3f}"}


def verdicts(rows: list[dict]) -> dict[str, Any]:
    return {"claims": [claim_pruning(rows), claim_int8(rows), claim_distillation(rows)], "goal": goal(rows)}


# --- rendering ----------------------------------------------------------------------------------


def _count(value: Any) -> str:
    v = _number(value)
    if v is None:
        return "–"
    return f"{v / 1e9:.2f} G" if v >= 1e9 else f"{v / 1e6:.2f} M" if v >= 1e6 else f"{int(v):,}"


def markdown(rows: list[dict], judged: dict[str, Any], context: dict[str, Any]) -> str:
    columns = ["variant", "ratio", "fine-tuning", "precision", "parameters", "file size", "MACs", "p50 ms",
               "teacher p50 ms", "speedup", "mAP@0.5", "mAP@0.5:0.95", "training"]
    lines = ["# Compression: pruning, fine-tuning, distillation, INT8", "", "## Context", ""]
    lines += [f"- **{k}**: {json.dumps(to_json(v)) if isinstance(v, (dict, list, tuple)) else v}"
              for k, v in context.items()]
    lines += ["", "## Variants", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    notes = []
    for row in rows:
        train = row.get("train") or {}
        trained = (f"{train.get('steps')} steps, {train.get('seconds', 0):.0f} s, loss {train.get('final_loss', 0):.4g}"
                   if train.get("steps") else "–")
        size = _number(row.get("file_bytes"))
        cells = [row.get("name"), _pct(row.get("ratio")), row.get("training"), row.get("precision"),
                 f"{_count(row.get('parameters'))} ({_pct(row.get('param_reduction'))} fewer)"
                 if _number(row.get("param_reduction")) else _count(row.get("parameters")),
                 "–" if size is None else f"{size / 2**20:.2f} MiB", _count(row.get("macs")),
                 _f(row.get("p50_ms"), 1), _f(row.get("teacher_p50_ms"), 1),
                 "–" if _number(row.get("speedup")) is None else f"{row['speedup']:.2f}x",
                 _f(row.get("map50")), _f(row.get("map50_95")), trained]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        for key in ("error", "fidelity_note"):
            if row.get(key):
                notes.append(f"- {row.get('name')}: {row[key]}")
    lines += ["", "mAP: pycocotools COCOeval of each variant's detections against the FP32 teacher's detections "
                  f"(score >= {context.get('reference_score_threshold', 'the serving threshold')}) on the held-out "
                  "evaluation images; the teacher scores 1.0. Speedup: the teacher's p50 over the variant's, both "
                  "measured in alternation in this run (ONNX Runtime, batch 1, "
                  f"{context.get('threads', 1)} thread). MACs: the trainable part (backbone and heads), per image."]
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines += ["", "## The claims, row by row", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for c in judged["claims"]:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {'<br>'.join(c['evidence']) or '–'} |")
    g = judged["goal"]
    lines += ["", "## Goal", "", f"{g['goal']}: **{'met' if g['met'] else 'not met'}**. {g['evidence']}.", "",
              f"![fidelity vs latency]({REPORT_PNG})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"teacher": "black", "none": "tab:gray", "plain": "tab:blue", "distill": "tab:red"}
    seen = set()
    for row in rows:
        x, y = _number(row.get("p50_ms")), _number(row.get("map50"))
        if x is None or y is None:
            continue
        training = str(row.get("training"))
        label = None if training in seen else {"none": "pruned", "plain": "pruned + plain fine-tuning",
                                               "distill": "pruned + distillation"}.get(training, training)
        seen.add(training)
        ax.scatter([x], [y], color=colours.get(training, "tab:green"), marker="s" if row.get("precision") == "int8"
                   else "o", s=45, zorder=3, label=label)
        ax.annotate(str(row.get("name")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    teacher = _teacher(rows)
    if teacher and _number(teacher.get("p50_ms")):
        ax.axvline(teacher["p50_ms"] / GOAL_SPEEDUP, color="tab:orange", linestyle="--",
                   label=f"{GOAL_SPEEDUP}x the teacher's speed")
    ax.axhline(GOAL_FIDELITY, color="tab:green", linestyle="--", label=f"fidelity {GOAL_FIDELITY}")
    ax.set_xlabel("p50 latency, batch 1, ONNX Runtime (ms)   (squares: INT8)")
    ax.set_ylabel("fidelity mAP@0.5 vs the FP32 teacher")
    ax.set_title("compressed students: fidelity vs latency", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(rows: list[dict], out_dir: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Write report.json, report.md and fidelity_vs_latency.png into out_dir; returns the paths and the verdicts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_reductions(rows)
    judged = verdicts(rows)
    paths = {"json": out_dir / REPORT_JSON, "md": out_dir / REPORT_MD, "png": out_dir / REPORT_PNG}
    document = {"context": context, "variants": rows, **judged}
    paths["json"].write_text(json.dumps(to_json(document), indent=2, sort_keys=True, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(rows, judged, context))
    plot(rows, paths["png"])
    return {"paths": paths, **judged}
