"""Pick the variant to serve: the fastest one that meets the accuracy floor and the latency budget.

Rows are the report's rows (builder/optimize/report.py): at least "name", "p50_ms", the metric
(e.g. "map50", fidelity to FP32) and optionally "file_bytes".
"""
from __future__ import annotations

import math
from typing import Any

METRIC_LABELS = {
    "map50": "mAP@0.5",
    "map50_95": "mAP@0.5:0.95",
    "labelled_map50": "labelled mAP@0.5",
    "labelled_map50_95": "labelled mAP@0.5:0.95",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / None / NaN / non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def select_variant(rows: list[dict], *, latency_budget_ms: float | None, accuracy_floor: float | None,
                   metric: str = "map50", latency_tolerance_ms: float = 0.0) -> tuple[dict | None, str]:
    """The fastest row with metric >= accuracy_floor and p50_ms <= latency_budget_ms (None: no constraint).

    Rows whose p50 lies within latency_tolerance_ms of the fastest qualifying one are tied (0: exact
    ties only); ties go to the higher metric, then the smaller file_bytes, then the name. Rows with an
    "error", without a p50, or (when a floor is given) without the metric are rejected. Returns the row
    (or None when nothing qualifies) and a human-readable reason naming every rejection.
    """
    label = metric_label(metric)
    refused = refusals(rows, latency_budget_ms=latency_budget_ms, accuracy_floor=accuracy_floor, metric=metric)
    qualified: list[tuple[dict, float, float | None]] = [
        (row, _number(row.get("p50_ms")), _number(row.get(metric))) for row in rows
        if str(row.get("name", "?")) not in refused]
    rejected = [f"rejected {name}: {why}" for name, why in refused.items()]

    constraints = []
    if latency_budget_ms is not None:
        constraints.append(f"the {latency_budget_ms:g} ms budget")
    if accuracy_floor is not None:
        constraints.append(f"the {label} {accuracy_floor:g} floor")
    if not qualified:
        what = " and ".join(constraints) if constraints else "the selection (no usable measurements)"
        detail = "; ".join(rejected) if rejected else "no variants"
        return None, f"no variant meets {what}: {detail}"

    fastest = min(p50 for _, p50, _ in qualified)
    tied = [q for q in qualified if q[1] <= fastest + latency_tolerance_ms]

    def rank(item: tuple[dict, float, float | None]) -> tuple:
        row, p50, acc = item
        size = _number(row.get("file_bytes"))
        return (-(acc if acc is not None else -math.inf), size if size is not None else math.inf, p50, str(row.get("name")))

    tied.sort(key=rank)
    best, best_p50, best_acc = tied[0]
    best_name = str(best.get("name"))

    why = [f"p50 {_ms(best_p50)}" + (f" <= {latency_budget_ms:g} ms budget" if latency_budget_ms is not None else "")]
    if best_acc is not None:
        why.append(f"{label} {_fmt(best_acc)}" + (f" >= {accuracy_floor:g} floor" if accuracy_floor is not None else ""))
    parts = [f"picked {best_name}: " + ", ".join(why)]
    if len(tied) > 1:
        others = []
        for row, p50, acc in tied[1:]:
            size_best, size_other = _number(best.get("file_bytes")), _number(row.get("file_bytes"))
            if acc != best_acc:
                how = f"higher {label} ({_fmt(best_acc)} vs {_fmt(acc)})"
            elif size_best != size_other:
                how = f"same {label}, smaller file ({_size(size_best)} vs {_size(size_other)})"
            else:
                how = "same accuracy and size, first by name"
            others.append(f"{row.get('name')} ({_ms(p50)}): {how}")
        tol = f" within {latency_tolerance_ms:g} ms" if latency_tolerance_ms else ""
        parts.append(f"tied on latency{tol} with " + "; ".join(others))
    tied_ids = {id(row) for row, _, _ in tied}
    slower = sorted((q for q in qualified if id(q[0]) not in tied_ids), key=lambda q: q[1])
    if slower:
        parts.append("faster than " + ", ".join(f"{row.get('name')} ({_ms(p50)})" for row, p50, _ in slower))
    parts.extend(rejected)
    return best, "; ".join(parts)


def refusals(rows: list[dict], *, latency_budget_ms: float | None, accuracy_floor: float | None,
             metric: str = "map50") -> dict[str, str]:
    """{name: why} of every row select_variant may not pick: failed, unmeasured, over the budget, under the floor."""
    label = metric_label(metric)
    refused = {}
    for row in rows:
        p50, acc = _number(row.get("p50_ms")), _number(row.get(metric))
        problems = []
        if row.get("error"):
            problems.append(f"failed ({row['error']})")
        if p50 is None:
            problems.append("no latency measured")
        elif latency_budget_ms is not None and p50 > latency_budget_ms:
            problems.append(f"p50 {_ms(p50)} > {latency_budget_ms:g} ms budget")
        if accuracy_floor is not None:
            if acc is None:
                problems.append(f"no {label} measured")
            elif acc < accuracy_floor:
                problems.append(f"{label} {_fmt(acc)} < {accuracy_floor:g} floor")
        if problems:
            refused[str(row.get("name", "?"))] = ", ".join(problems)
    return refused


def _size(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 1024:.1f} KiB"
