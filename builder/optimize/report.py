"""The optimization report: report.json, report.md and accuracy_vs_latency.png for a set of variants.

A row is a flat dict per variant (variant_row builds one from the evaluate.py results):
  name, runtime, precision, file_bytes, weight_bytes, parameters,
  p50_ms, p99_ms, mean_ms, images_per_s, best_batch, throughput_note,
  map50, map50_95 (fidelity to the FP32 reference's detections), fidelity_note,
  labelled_map50, labelled_map50_95 (against a labels file, when one was given),
  quantized_ops ({op type: count}), error (why the variant could not be measured),
  device_classes (ArtifactClasses.to_dict()), refused (why the selection may not pick it).
Missing values are None; every key is optional for write_report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.optimize.evaluate import MAP_SCORE_THRESHOLD
from builder.optimize.manifest import to_json
from builder.optimize.select import _number, metric_label
from builder.optimize.variants import Variant

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "accuracy_vs_latency.png"


def variant_row(variant: Variant, *, stats: dict | None = None, latency: dict | None = None,
                throughput: dict | None = None, fidelity: dict | None = None, labelled: dict | None = None,
                quantized_ops: dict | None = None, error: str | None = None) -> dict[str, Any]:
    """One report row from file_stats, measure_latency, measure_throughput, fidelity_map, labelled_map results."""
    stats, latency, throughput, fidelity = stats or {}, latency or {}, throughput or {}, fidelity or {}
    row: dict[str, Any] = {
        "name": variant.name, "runtime": variant.runtime, "precision": variant.precision,
        "path": str(variant.path), "targets": list(variant.targets),
        "file_bytes": stats.get("file_bytes"), "weight_bytes": stats.get("weight_bytes"), "parameters": stats.get("parameters"),
        "p50_ms": latency.get("p50_ms"), "p99_ms": latency.get("p99_ms"), "mean_ms": latency.get("mean_ms"),
        "images_per_s": throughput.get("images_per_s"), "best_batch": throughput.get("best_batch"),
        "throughput_per_batch": throughput.get("per_batch"), "throughput_note": throughput.get("note"),
        "map50": fidelity.get("map50"), "map50_95": fidelity.get("map50_95"), "fidelity_note": fidelity.get("note"),
        "labelled_map50": labelled.get("map50") if labelled else None,
        "labelled_map50_95": labelled.get("map50_95") if labelled else None,
        "quantized_ops": quantized_ops or None,
        "error": error,
    }
    return row


# --- formatting ---------------------------------------------------------------------------------


def _bytes(value: Any) -> str:
    v = _number(value)
    if v is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{int(v)} B"


def _count(value: Any) -> str:
    v = _number(value)
    if v is None:
        return "–"
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{int(v):,}"


def _num(value: Any, digits: int = 1) -> str:
    v = _number(value)
    return "–" if v is None else f"{v:.{digits}f}"


def _ops(value: Any) -> str:
    if not value:
        return "–"
    return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _unverified(classes: dict) -> str:
    """The notes of an ArtifactClasses record that say where its fidelity was not measured, or a dash."""
    if classes.get("verified_on"):
        return "–"
    return "; ".join(sorted(set(classes.get("notes", {}).values()))) or "unverified: no fidelity measured"


def _markdown(rows: list[dict], selection: tuple[dict | None, str] | None, context: dict) -> str:
    has_labelled = any(_number(r.get("labelled_map50")) is not None for r in rows)
    has_ops = any(r.get("quantized_ops") for r in rows)
    columns = ["variant", "runtime", "precision", "file size", "weight bytes", "parameters", "p50 ms", "p99 ms",
               "throughput img/s (batch)", "mAP@0.5 vs FP32", "mAP@0.5:0.95 vs FP32"]
    if has_labelled:
        columns += ["labelled mAP@0.5", "labelled mAP@0.5:0.95"]
    if has_ops:
        columns.append("quantized ops")
    chosen = selection[0].get("name") if selection and selection[0] else None
    lines = ["# Model variants: accuracy, latency and size", ""]
    if context:
        lines += ["## Context", ""]
        lines += [f"- **{_cell(k)}**: {_cell(json.dumps(to_json(v)) if isinstance(v, (dict, list, tuple)) else v)}"
                  for k, v in context.items()]
        lines.append("")
    lines += ["## Variants", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    notes = []
    for row in rows:
        name = str(row.get("name", "?"))
        throughput = "–"
        if _number(row.get("images_per_s")) is not None:
            throughput = f"{_num(row.get('images_per_s'))} ({row.get('best_batch')})"
        cells = [f"**{name}**" if name == chosen else name, row.get("runtime") or "–", row.get("precision") or "–",
                 _bytes(row.get("file_bytes")), _bytes(row.get("weight_bytes")), _count(row.get("parameters")),
                 _num(row.get("p50_ms")), _num(row.get("p99_ms")), throughput,
                 _num(row.get("map50"), 3), _num(row.get("map50_95"), 3)]
        if has_labelled:
            cells += [_num(row.get("labelled_map50"), 3), _num(row.get("labelled_map50_95"), 3)]
        if has_ops:
            cells.append(_ops(row.get("quantized_ops")))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        for key in ("error", "throughput_note", "fidelity_note"):
            if row.get(key):
                notes.append(f"- {name}: {row[key]}")
    lines.append("")
    low = context.get("map_score_threshold", MAP_SCORE_THRESHOLD)
    high = context.get("reference_score_threshold", "the serving threshold")
    lines.append(f"mAP vs FP32: COCOeval of each variant's detections (score > {low}) against the FP32 variant's "
                 f"detections with score >= {high} as ground truth; 1.0 means the same boxes, classes and ranking.")
    if notes:
        lines += ["", "Notes:", ""] + notes
    classes = [(str(r.get("name", "?")), r["device_classes"]) for r in rows if r.get("device_classes")]
    if classes:
        lines += ["", "## Device classes", "", "| variant | built for | verified on (fidelity measured) | notes |",
                  "|---|---|---|---|"]
        lines += [f"| {_cell(name)} | {', '.join(c.get('built_for', []))} | {', '.join(c.get('verified_on', [])) or 'none'} | "
                  f"{_cell(_unverified(c))} |" for name, c in classes]
    refused = [(str(r.get("name", "?")), r["refused"]) for r in rows if r.get("refused")]
    if refused:
        lines += ["", "## Refused", ""] + [f"- {_cell(name)}: {_cell(why)}" for name, why in refused]
    lines += ["", "## Selection", ""]
    if selection is None:
        lines.append("No selection was asked for (no latency budget or accuracy floor).")
    else:
        row, reason = selection
        lines.append(f"**{row.get('name')}**" if row else "**none**")
        lines += ["", _cell(reason)]
    lines += ["", f"![accuracy vs latency]({REPORT_PNG})", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, selection: tuple[dict | None, str] | None, context: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    chosen = selection[0].get("name") if selection and selection[0] else None
    points = [(r, _number(r.get("p50_ms")), _number(r.get("map50"))) for r in rows]
    plotted = [(r, x, y) for r, x, y in points if x is not None and y is not None]
    for row, x, y in plotted:
        is_chosen = row.get("name") == chosen
        ax.scatter([x], [y], s=70 if is_chosen else 40, marker="*" if is_chosen else "o",
                   color="tab:red" if is_chosen else "tab:blue", zorder=3)
        ax.annotate(str(row.get("name")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    budget, floor = _number(context.get("latency_budget_ms")), _number(context.get("accuracy_floor"))
    if budget is not None:
        ax.axvline(budget, color="tab:orange", linestyle="--", label=f"budget {budget:g} ms")
    if floor is not None:
        ax.axhline(floor, color="tab:green", linestyle="--", label=f"floor {floor:g}")
    if budget is not None or floor is not None:
        ax.legend(loc="lower right", fontsize=8)
    missing = [str(r.get("name")) for r, x, y in points if x is None or y is None]
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel(f"{metric_label('map50')} vs FP32")
    ax.set_title("accuracy vs latency" + (f" (not plotted: {', '.join(missing)})" if missing else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    if not plotted and budget is None and floor is None:
        ax.text(0.5, 0.5, "no variant has both a latency and a mAP", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(rows: list[dict], out_dir: Path, *, selection: tuple[dict | None, str] | None,
                 context: dict) -> dict[str, Path]:
    """Write report.json, report.md and accuracy_vs_latency.png into out_dir; returns {"json", "md", "png"} paths.

    context: free-form facts about the run (machine, threads, images, ...); the keys latency_budget_ms
    and accuracy_floor, when present, draw the budget and floor lines on the plot; map_score_threshold and
    reference_score_threshold, when present, are quoted in the explanation of the fidelity columns.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / REPORT_JSON, "md": out_dir / REPORT_MD, "png": out_dir / REPORT_PNG}
    document = {
        "context": context,
        "variants": rows,
        "selection": None if selection is None else {"name": selection[0].get("name") if selection[0] else None,
                                                     "reason": selection[1]},
    }
    paths["json"].write_text(json.dumps(to_json(document), indent=2, sort_keys=True, allow_nan=False) + "\n")
    paths["md"].write_text(_markdown(rows, selection, context))
    _plot(rows, paths["png"], selection, context)
    return paths
