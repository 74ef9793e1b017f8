"""The evaluation's output folder: ``metrics.json``, ``report.md`` and PNG plots.

The Markdown report is written for someone who never saw the code: each task gets one table with the
models and the baselines side by side, every column says which direction is better, and a short legend
under the table says what the numbers mean and what "—" (not measurable) stands for. Column names and
directions come from the metric registry (:mod:`cellduality.metrics.registry`); the best model or
baseline value of each column is in bold, and a line under each table says whether a model or a simple
baseline is strongest (:mod:`cellduality.eval.headline`). A row is only called a *ceiling* if it bounds
every row it is compared with (:func:`~cellduality.metrics.registry.honest_kinds`); real cells scored
like a method are a *reference*. Plots live in :mod:`cellduality.eval.plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellduality.eval.headline import task_headline
from cellduality.eval.markdown import fmt, markdown_table
from cellduality.eval.plots import plot_confusions, plot_pca, plot_pearson_delta, write_plots
from cellduality.metrics.registry import best_row, honest_kinds, metric_info, registry_table

if TYPE_CHECKING:
    from cellduality.eval.scoring import TaskResult

TASK_TITLES = {
    "annotation": "Cell type annotation (cell -> type)",
    "generation": "Conditional generation (type -> cell)",
    "drug_sensitivity": "Drug sensitivity (cell + drug -> sensitive / resistant)",
    "perturbation": "Perturbation response (control cell + perturbation -> cell)",
    "neighbourhood": "Knowledge-graph neighbourhood editing (held-out target -> edited neighbourhood -> mean response)",
}

#: Per task, the metric keys of its table, in column order; labels and directions come from the
#: registry (:mod:`cellduality.metrics.registry`), so every header says which way is better.
TASK_METRICS: dict[str, list[str]] = {
    "annotation": ["accuracy", "macro_f1", "valid_output_rate", "format_rate", "n"],
    "drug_sensitivity": ["accuracy", "macro_f1", "valid_output_rate", "format_rate", "n"],
    "generation": ["knn_accuracy", "scfid", "rwjs_nearest", "valid_output_rate", "format_rate", "n"],
    "perturbation": [
        "pearson_delta",
        "pearson_delta_de",
        "rmse_de",
        "de_spearman",
        "retrieval",
        "scfid",
        "pathway_cosine",
        "pathway_pearson",
        "valid_output_rate",
        "format_rate",
        "n_scored",
    ],
    "neighbourhood": [
        "pearson_delta",
        "pearson_delta_de",
        "rmse_de",
        "retrieval",
        "gain_vs_unedited",
        "valid_edit_fraction",
        "empty_edit_rate",
        "valid_output_rate",
        "format_rate",
        "n_scored",
    ],
}


#: task -> [(metric key, column header with ``{k}`` / ``{n_de}`` placeholders)]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    task: [(key, metric_info(key).label + metric_info(key).arrow) for key in keys]
    for task, keys in TASK_METRICS.items()
}

LEGENDS = {
    "annotation": (
        "Accuracy over all test cells, and macro-F1 averaged over the classes present in the test labels "
        "(every class weighted equally; candidate labels absent from the test set do not count). An answer "
        "that names no candidate counts as wrong. *Valid output*: share of answers naming one of the prompt's candidates. "
        "*Format*: share of completions exactly `<think>…</think><answer>…</answer>`. Baselines read the "
        "cells' real expression (train cells -> test cells), not the sentence."
    ),
    "generation": (
        "Generated sentences are turned back into expression with the dataset's rank -> expression fit. "
        "*kNN@{k}*: share of generated cells that a {k}-nearest-neighbour classifier fitted on the real test "
        "cells labels as the prompted type. *scFID*: Fréchet distance between generated and real cells of "
        "each type in a PCA of the real cells (mean over types; lower is better). *RWJS*: rank-weighted "
        "Jaccard similarity of each generated sentence to the closest real cell of its type. *Valid output*: "
        "share of answers with at least one known gene."
    ),
    "perturbation": (
        "Per perturbation (and cell context), the mean of the predicted cells minus the control mean is "
        "compared with the observed mean minus the control mean (Δ). *Pearson Δ* over all genes and over the "
        "top-{n_de} differentially expressed genes; *RMSE* and *DE Spearman* on those genes; *retrieval*: "
        "share of other perturbations the prediction resembles less than its own (0.5 = chance); *scFID* "
        "per perturbation; *PROGENy*: agreement of pathway activities ({pathway_genes} of the dataset's "
        "genes carry PROGENy weights). Rows show means over the perturbations where a value exists; the last column "
        "counts those with a Pearson Δ (none: no usable prediction, or a prediction equal to the control). Mean-profile baselines predict one profile, so scFID does not apply."
    ),
}
LEGENDS["neighbourhood"] = (
    "Every row predicts a held-out target's mean profile as the control mean plus the mean training Δ of a "
    "set of training perturbations: a model's edit of the prompt's graph neighbourhood (invalid items ignored; "
    "no edit keeps the neighbourhood), the unedited neighbourhood itself, or a baseline's set. An empty set "
    "predicts the mean of all training perturbations. Metrics as for perturbation response, against all real "
    "cells of the target in its context. *Gain over unedited*: mean per-target difference in Pearson Δ from "
    "the unedited neighbourhood. *Valid edits*: share of the proposed additions and removals that were "
    "allowed (additions among the prompt's candidates, removals among its neighbours). *Empty edits*: share of "
    "edits that change nothing. *Valid output*: share of answers with an `add:` or `remove:` clause."
)
LEGENDS["drug_sensitivity"] = LEGENDS["annotation"]

#: Rows of the per-perturbation Markdown table (the heading says "first N of M" beyond it).
PER_PERTURBATION_ROWS = 200


# ----------------------------------------------------------------------------------------------------
# JSON


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numpy -> Python, ``nan``/``inf`` -> ``null`` (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def metrics_payload(tasks: Mapping[str, TaskResult], info: Mapping[str, Any]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the run description, per task every method's metrics, and the
    registry entries (label, direction, best value) of the metrics the tables show."""
    _honest(tasks)
    keys = list(dict.fromkeys(k for t in tasks for k in TASK_METRICS.get(t, [])))
    out: dict[str, Any] = {"run": dict(info), "metric_info": registry_table(keys), "tasks": {}}
    for name, result in tasks.items():
        methods = {}
        for score in result.methods:
            item: dict[str, Any] = {"kind": score.kind, "metrics": score.metrics}
            if score.per_condition:
                item["per_condition"] = score.per_condition
            if score.confusion is not None:
                item["confusion"] = {"labels": [*result.labels, "(invalid)"], "matrix": score.confusion}
            if score.note:
                item["note"] = score.note
            if score.per_row is not None and score.kind == "model":
                item["per_row"] = score.per_row
            methods[score.name] = item
        out["tasks"][name] = {"n_examples": result.n_examples, "info": result.info, "methods": methods}
    return _jsonable(out)


# ----------------------------------------------------------------------------------------------------
# Markdown


def _honest(tasks: Mapping[str, TaskResult]) -> None:
    """Relabel, in place, every ``ceiling`` row that another row beats (idempotent; see honest_kinds)."""
    for result in tasks.values():
        honest_kinds(result.methods, TASK_METRICS.get(result.task, []))


def task_table(result: TaskResult) -> str:
    """The task's main table: one row per method, the task's metric columns, each column's best in bold.

    Bold marks the best model or baseline value by the registry's direction (reference rows are real
    cells, not competitors, so they are never bold).
    """
    params = {"k": result.info.get("k", 3), "n_de": result.info.get("n_de", 20)}
    cols = COLUMNS.get(result.task, [])
    headers = ["method", "type", *[title.format(**params) for _, title in cols]]
    competitors = [s for s in result.methods if s.kind in ("model", "baseline")]
    best = {}
    for key, _ in cols:
        if metric_info(key).higher_is_better is not None and metric_info(key).ranked:
            top = best_row(competitors, key)
            best[key] = float(top.metrics[key]) if top is not None else None

    def cell(s: Any, key: str) -> str:
        text = fmt(s.metrics.get(key), key)
        bold = s in competitors and best.get(key) is not None and s.metrics.get(key) == best[key]
        return f"**{text}**" if bold else text

    rows = [[s.name, s.kind, *[cell(s, key) for key, _ in cols]] for s in result.methods]
    return markdown_table(headers, rows)


def headline_lines(result: TaskResult) -> list[str]:
    """Per headline metric: the best model, the simplest and the strongest baseline, and the verdict."""
    lines = []
    for r in task_headline(result):
        if not r["models"]:
            continue
        best = ", ".join(f"{name} {fmt(v)}" for name, v in r["models"].items())
        lines.append(
            f"- **{r['metric']}**: {best}; simplest baseline {r['baseline'] or '—'} {fmt(r['baseline value'])}, "
            f"strongest baseline {r['strongest baseline'] or '—'} {fmt(r['strongest value'])}: "
            f"**{r['verdict']}**"
        )
    return lines


def per_perturbation_table(result: TaskResult, limit: int | None = None) -> str:
    """Pearson Δ (all genes) per perturbation and method: where a model wins and where it fails.

    All perturbations by default; :func:`render_markdown` says "first N of M" when ``limit`` cuts.
    """
    groups = list(result.info.get("perturbations") or [])[:limit]
    methods = [s for s in result.methods if s.per_condition]
    if not groups or not methods:
        return ""
    headers = ["perturbation", "cells", *[s.name for s in methods]]
    rows = []
    for g in groups:
        n = next((s.per_condition[g].get("n") for s in methods if g in s.per_condition), None)
        rows.append(
            [g, fmt(n, "n"), *[fmt(s.per_condition.get(g, {}).get("pearson_delta")) for s in methods]]
        )
    return markdown_table(headers, rows)


def _run_section(info: Mapping[str, Any]) -> list[str]:
    lines = [f"- Dataset: **{info.get('dataset')}**, split **{info.get('split')}**"]
    lines += [f"- **Warning**: {w}" for w in info.get("warnings") or []]
    modes = {t: mode for t, mode in (info.get("split_mode") or {}).items() if mode}
    if modes:
        lines.append("- Split kind per task: " + ", ".join(f"{t}: {mode}" for t, mode in modes.items()))
    counts = info.get("n_examples") or {}
    if counts:
        lines.append("- Examples evaluated: " + ", ".join(f"{t}: {n}" for t, n in counts.items()))
    gen = info.get("generation") or {}
    if gen:
        decoding = "greedy" if not gen.get("temperature") else f"temperature {gen.get('temperature')}"
        lines.append(
            f"- Generation: {gen.get('backend')} backend, {decoding}, at most {gen.get('max_new_tokens')} new tokens"
        )
    for model in info.get("models") or []:
        where = f"`{model.get('path')}`" + (
            f" + LoRA `{model.get('adapter')}`" if model.get("adapter") else ""
        )
        line = f"- Model **{model.get('name')}**: {where}"
        sv = model.get("self_verify")
        if sv:
            line += (
                f"; self-verification with {info.get('self_verify')} samples: chosen answers' mean dual score "
                f"{fmt(sv.get('dual_score_chosen'))}, examples with a usable sample {fmt(sv.get('any_sample_valid'))}, "
                f"changed from the first sample {fmt(sv.get('changed_from_first'))}"
            )
        lines.append(line)
    if not info.get("models"):
        lines.append("- No model: baselines only")
    fit = info.get("fit") or {}
    if fit:
        lines.append(
            f"- Sentence -> expression: expression = {fmt(fit.get('slope'))} * log10(rank) + "
            f"{fmt(fit.get('intercept'))} (R² = {fmt(fit.get('r2'))}); generated cells are reconstructions, "
            "not measurements"
        )
    if info.get("self_verify"):
        lines.append(
            f"- Rows marked `+ self-verify@{info['self_verify']}`: {info['self_verify']} sampled answers per "
            "example, keeping the one whose dual task (in-painting hidden genes, or naming the condition of the "
            "generated cell) the same model answers best. The plain rows are greedy answers."
        )
    return lines


def render_markdown(
    tasks: Mapping[str, TaskResult], info: Mapping[str, Any], plots: Mapping[str, Sequence[str]]
) -> str:
    """The whole ``report.md`` text."""
    _honest(tasks)
    parts = ["# CellDuality evaluation", "", *_run_section(info), ""]
    parts += [
        "Each table lists the evaluated models (type *model*), simple baselines on the same examples "
        "(*baseline*) and real held-out cells scored the same way (*reference*: what real cells reach, "
        "not an upper bound; a model can score above it). ↑: higher is better, ↓: lower is better; "
        "**bold**: the best model or baseline in the column; —: not measurable (no usable output, or not "
        "defined for that row).",
        "",
    ]
    for name, result in tasks.items():
        params = {
            "k": result.info.get("k", 3),
            "n_de": result.info.get("n_de", 20),
            "pathway_genes": result.info.get("pathway_genes", 0),
        }
        parts += [f"## {TASK_TITLES.get(name, name)}", "", f"{result.n_examples} test examples.", ""]
        if not result.methods:
            parts += ["Nothing to report: no model and no baseline.", ""]
        else:
            parts += [task_table(result), ""]
            verdicts = headline_lines(result)
            parts += [*verdicts, ""] if verdicts else []
            parts += [LEGENDS.get(name, "").format(**params), ""]
        notes = [f"*{s.name}*: {s.note}" for s in result.methods if s.note]
        if result.info.get("note"):
            notes.append(str(result.info["note"]))
        parts += [f"- {n}" for n in notes] + ([""] if notes else [])
        if name in ("perturbation", "neighbourhood"):
            table = per_perturbation_table(result, PER_PERTURBATION_ROWS)
            n_groups = len(result.info.get("perturbations") or [])
            if table:
                shown = (
                    f"all {n_groups}"
                    if n_groups <= PER_PERTURBATION_ROWS
                    else f"first {PER_PERTURBATION_ROWS} of {n_groups}"
                )
                parts += [f"### Pearson Δ (all genes) ↑ per perturbation ({shown})", "", table, ""]
            from cellduality.eval.cell_eval import report_section

            parts += report_section(result)
        for path in plots.get(name, []):
            parts += [f"![{Path(path).stem}]({path})", ""]
    notes = info.get("notes") or []
    if notes:
        parts += ["## What was done to the data", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def write_report(
    tasks: Mapping[str, TaskResult], info: Mapping[str, Any], out: str | Path, plots: bool = True
) -> dict[str, Path]:
    """Write ``metrics.json``, the plots and ``report.md`` into ``out``; return their paths."""
    _honest(tasks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    made = write_plots(tasks, out) if plots else {}
    (out / "metrics.json").write_text(json.dumps(metrics_payload(tasks, info), indent=1) + "\n")
    files["metrics"] = out / "metrics.json"
    (out / "report.md").write_text(render_markdown(tasks, info, made))
    files["report"] = out / "report.md"
    for task, paths in made.items():
        for p in paths:
            files[f"plot:{task}:{Path(p).stem}"] = out / p
    return files


__all__ = [
    "COLUMNS",
    "TASK_METRICS",
    "fmt",
    "headline_lines",
    "markdown_table",
    "metrics_payload",
    "plot_confusions",
    "plot_pca",
    "plot_pearson_delta",
    "render_markdown",
    "task_table",
    "write_plots",
    "write_report",
]
