"""The tuning report: the table of every candidate tried (Markdown), the choice and JSON for tools."""
from __future__ import annotations

import json
from pathlib import Path

from builder.tune.measure import Trial


def table(trials: list[Trial], concurrencies: tuple[int, ...], chosen: Trial | None = None) -> str:
    head = "| | candidate | " + " | ".join(f"c{c} img/s | c{c} p99 ms" for c in concurrencies) + " | J/inference |"
    lines = [head, "|---|---|" + "---|---|" * len(concurrencies) + "---|"]
    for t in trials:
        mark = "**chosen**" if t is chosen else ""
        if t.error:
            cells = " | ".join("-" for _ in range(2 * len(concurrencies)))
            lines.append(f"| {mark} | {t.candidate.label} (failed: {t.error[:80]}) | {cells} | - |")
            continue
        cells = []
        for c in concurrencies:
            lv = t.at(c)
            err = f" ({lv.errors} errors)" if lv and lv.errors else ""
            cells += ["-", "-"] if lv is None else [f"{lv.images_per_s:.2f}{err}", f"{lv.p99_ms:.1f}"]
        joules = "not readable" if t.joules_per_inference is None else f"{t.joules_per_inference:.3f}"
        lines.append(f"| {mark} | {t.candidate.label} | " + " | ".join(cells) + f" | {joules} |")
    return "\n".join(lines)


def write_report(out: Path, trials: list[Trial], concurrencies: tuple[int, ...], objective: str,
                 chosen: Trial | None, reason: str, context: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "tune_report.md"
    md.write_text("\n".join([
        f"# edgestack tune: objective {objective}", "",
        *(f"- {k}: {v}" for k, v in context.items()), "",
        table(trials, concurrencies, chosen), "",
        f"Choice: {reason}", ""]))
    js = out / "tune_report.json"
    js.write_text(json.dumps({"objective": objective, "reason": reason, "context": context,
                              "chosen": chosen.to_dict() if chosen else None,
                              "trials": [t.to_dict() for t in trials]}, indent=2) + "\n")
    return md, js
