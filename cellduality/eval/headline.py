"""The headline of a report: per task, the few numbers a reader looks at, against honest baselines.

A headline that compares a model only with the weakest baseline flatters it: on perturbation response,
"predict the control" is easy to beat on top-20 DE genes, while the mean-perturbation baseline often
wins on all genes (Ahlmann-Eltze et al. 2025: simple baselines often beat deep models). So every
headline row shows the *simplest* baseline (the floor) and the *strongest* one (the bar to clear), uses
the registry's friendly metric names and directions (:mod:`cellduality.metrics.registry`), shows
accuracy with macro-F1 and the all-genes Pearson Δ with the DE one, and says in words when a baseline
wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cellduality.metrics.registry import best_row, metric_info

if TYPE_CHECKING:
    from cellduality.eval.scoring import TaskResult

#: task -> the metrics its headline shows, most important first
HEADLINE_METRICS: dict[str, list[str]] = {
    "annotation": ["accuracy", "macro_f1"],
    "drug_sensitivity": ["accuracy", "macro_f1"],
    "generation": ["knn_accuracy"],
    "perturbation": ["pearson_delta_de", "pearson_delta"],
    "neighbourhood": ["pearson_delta", "pearson_delta_de"],
}

#: task -> its simplest honest baseline (the floor, in the model's own representation where possible)
SIMPLEST_BASELINE: dict[str, str] = {
    "annotation": "majority class",
    "drug_sensitivity": "majority class",
    "generation": "class-mean sentence",
    "perturbation": "control cell's sentence",
    "neighbourhood": "graph neighbourhood, unedited",  # the predictor the model edits
}


def _value(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def verdict(key: str, best_model: tuple[str, float | None], strongest: tuple[str, float | None]) -> str:
    """In words: does the best model beat the strongest baseline on ``key``, or does a baseline win?"""
    info = metric_info(key)
    name, value = best_model
    base, base_value = strongest
    if value is None:
        return "no model could be scored"
    if base_value is None:
        return f"{name} (no baseline to compare)"
    if info.better(value, base_value):
        return f"{name} beats every baseline"
    if value == base_value:
        return f"tie: {name} equals the {base} baseline"
    return f"a simple baseline wins: {base} ({base_value:.3f} vs {name} {value:.3f})"


def task_headline(result: TaskResult, dataset: str = "", **params: Any) -> list[dict[str, Any]]:
    """Headline rows of one task: per headline metric, every model, the simplest and strongest baselines.

    Each row holds ``metric`` (friendly label with its direction arrow), ``metric_key``, one entry per
    model name, ``baseline`` / ``baseline value`` (the simplest), ``strongest baseline`` /
    ``strongest value`` and ``verdict``. Values are ``None`` where not measurable.
    """
    params = {"k": result.info.get("k", 3), "n_de": result.info.get("n_de", 20), **params}
    models = [s for s in result.methods if s.kind == "model"]
    baselines = [s for s in result.methods if s.kind == "baseline"]
    simplest_name = SIMPLEST_BASELINE.get(result.task, "")
    simplest = next((s for s in baselines if s.name == simplest_name), baselines[0] if baselines else None)
    rows = []
    for key in HEADLINE_METRICS.get(result.task, ["accuracy"]):
        info = metric_info(key)
        strongest = best_row(baselines, key)
        top = best_row(models, key)
        row: dict[str, Any] = {
            "dataset": dataset,
            "task": result.task,
            "metric": info.header(**params),
            "metric_key": key,
            "higher_is_better": info.higher_is_better,
            "models": {s.name: _value(s.metrics.get(key)) for s in models},
            "baseline": simplest.name if simplest else "",
            "baseline value": _value(simplest.metrics.get(key)) if simplest else None,
            "strongest baseline": strongest.name if strongest else "",
            "strongest value": _value(strongest.metrics.get(key)) if strongest else None,
        }
        row.update(row["models"])
        row["verdict"] = verdict(
            key,
            (top.name, _value(top.metrics.get(key))) if top else ("", None),
            (row["strongest baseline"], row["strongest value"]),
        )
        rows.append(row)
    return rows


def headline_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Headline rows for several datasets: ``results`` maps a dataset to an object with ``.tasks``."""
    rows = []
    for dataset, result in results.items():
        for task_result in result.tasks.values():
            rows.extend(task_headline(task_result, dataset))
    return rows


def _fmt(value: Any) -> str:
    v = _value(value)
    return "—" if v is None else f"{v:.3f}"


def headline_markdown(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[str]:
    """The headline as Markdown table lines (models side by side, then both baselines and the verdict)."""
    lines = [
        "| dataset | task | metric | "
        + " | ".join(models)
        + " | simplest baseline | strongest baseline | verdict |",
        "|" + "---|" * (5 + len(models) + 1),
    ]
    for r in rows:
        cells = [
            str(r.get("dataset", "")),
            str(r["task"]),
            str(r["metric"]),
            *[_fmt(r.get("models", {}).get(m)) for m in models],
            f"{r['baseline']} {_fmt(r['baseline value'])}" if r["baseline"] else "—",
            f"{r['strongest baseline']} {_fmt(r['strongest value'])}" if r["strongest baseline"] else "—",
            str(r["verdict"]),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


__all__ = [
    "HEADLINE_METRICS",
    "SIMPLEST_BASELINE",
    "headline_markdown",
    "headline_rows",
    "task_headline",
    "verdict",
]
