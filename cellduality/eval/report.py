"""The evaluation's output folder: ``metrics.json``, ``report.md`` and PNG plots.

The Markdown report is written for someone who never saw the code: each task gets one table with the
models and the baselines side by side, every column says which direction is better, and a short legend
under the table says what the numbers mean and what "—" (not measurable) stands for. Plots use
matplotlib's ``Figure`` directly (Agg canvas, no pyplot state), so writing a report never opens a window
and is safe from threads and servers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cellduality.eval.scoring import TaskResult

TASK_TITLES = {
    "annotation": "Cell type annotation (cell -> type)",
    "generation": "Conditional generation (type -> cell)",
    "drug_sensitivity": "Drug sensitivity (cell + drug -> sensitive / resistant)",
    "perturbation": "Perturbation response (control cell + perturbation -> cell)",
}

_RATES = [("valid_output_rate", "valid output ↑"), ("format_rate", "format ↑")]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "annotation": [("accuracy", "accuracy ↑"), ("macro_f1", "macro-F1 ↑"), *_RATES, ("n", "n")],
    "drug_sensitivity": [("accuracy", "accuracy ↑"), ("macro_f1", "macro-F1 ↑"), *_RATES, ("n", "n")],
    "generation": [
        ("knn_accuracy", "kNN@{k} accuracy ↑"),
        ("scfid", "scFID ↓"),
        ("rwjs_nearest", "RWJS to nearest real cell ↑"),
        *_RATES,
        ("n", "n"),
    ],
    "perturbation": [
        ("pearson_delta", "Pearson Δ all genes ↑"),
        ("pearson_delta_de", "Pearson Δ top-{n_de} DE ↑"),
        ("rmse_de", "RMSE top-{n_de} DE ↓"),
        ("de_spearman", "DE Spearman ↑"),
        ("retrieval", "retrieval ↑ (0.5 = random)"),
        ("scfid", "scFID ↓"),
        ("pathway_cosine", "PROGENy cosine ↑"),
        ("pathway_pearson", "PROGENy Pearson ↑"),
        *_RATES,
        ("n_scored", "perturbations with a Pearson Δ"),
    ],
}

LEGENDS = {
    "annotation": (
        "Accuracy and macro-F1 (every type weighted equally) over all test cells; an answer that names no "
        "candidate counts as wrong. *Valid output*: share of answers naming one of the prompt's candidates. "
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
LEGENDS["drug_sensitivity"] = LEGENDS["annotation"]


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
    """What ``metrics.json`` holds: the run description and, per task, every method's metrics."""
    out: dict[str, Any] = {"run": dict(info), "tasks": {}}
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
            methods[score.name] = item
        out["tasks"][name] = {"n_examples": result.n_examples, "info": result.info, "methods": methods}
    return _jsonable(out)


# ----------------------------------------------------------------------------------------------------
# Markdown


def fmt(value: Any, key: str = "") -> str:
    """A table cell: 3 decimals, counts as integers, ``—`` for not measurable."""
    if value is None:
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(f):
        return "—"
    if key in ("n", "n_scored", "n_perturbations"):
        return str(round(f))
    return f"{f:.3f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def task_table(result: TaskResult) -> str:
    """The task's main table: one row per method, the task's metric columns."""
    params = {"k": result.info.get("k", 3), "n_de": result.info.get("n_de", 20)}
    cols = COLUMNS.get(result.task, [])
    headers = ["method", "type", *[title.format(**params) for _, title in cols]]
    rows = [[s.name, s.kind, *[fmt(s.metrics.get(key), key) for key, _ in cols]] for s in result.methods]
    return markdown_table(headers, rows)


def per_perturbation_table(result: TaskResult, limit: int = 60) -> str:
    """Pearson Δ (all genes) per perturbation and method: where a model wins and where it fails."""
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
    parts = ["# CellDuality evaluation", "", *_run_section(info), ""]
    parts += [
        "Each table lists the evaluated models (type *model*), simple baselines on the same examples "
        "(*baseline*) and, where one exists, the best score the data allow (*ceiling*). ↑: higher is "
        "better, ↓: lower is better, —: not measurable (no usable output, or not defined for that row).",
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
            parts += [task_table(result), "", LEGENDS.get(name, "").format(**params), ""]
        notes = [f"*{s.name}*: {s.note}" for s in result.methods if s.note]
        if result.info.get("note"):
            notes.append(str(result.info["note"]))
        parts += [f"- {n}" for n in notes] + ([""] if notes else [])
        if name == "perturbation":
            table = per_perturbation_table(result)
            if table:
                parts += ["### Pearson Δ (all genes) per perturbation", "", table, ""]
        for path in plots.get(name, []):
            parts += [f"![{Path(path).stem}]({path})", ""]
    notes = info.get("notes") or []
    if notes:
        parts += ["## What was done to the data", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# plots


def _figure(n_panels: int, panel: tuple[float, float], cols: int = 3) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "plot"


def plot_confusions(result: TaskResult, path: Path) -> Path | None:
    """Row-normalised confusion matrices, one panel per method; the last column counts invalid answers."""
    scored = [s for s in result.methods if s.confusion is not None]
    if not scored or not result.labels:
        return None
    labels = result.labels
    size = max(3.2, 0.35 * len(labels) + 2.0)
    fig, axes = _figure(len(scored), (size + 0.6, size))
    for ax, score in zip(axes, scored, strict=True):
        counts = np.asarray(score.confusion, dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        image = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(score.name, fontsize=9)
        ax.set_xticks(range(len(labels) + 1), [*labels, "(invalid)"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if len(labels) <= 12:
            for (i, j), c in np.ndenumerate(counts):
                if c:
                    ax.text(
                        j,
                        i,
                        str(int(c)),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black",
                    )
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the true class")
    fig.savefig(path, dpi=110)
    return path


def plot_pca(result: TaskResult, path: Path, max_legend: int = 12) -> Path | None:
    """Generated cells over the real ones in the first two principal components of the real cells."""
    if result.reference_points is None or result.reference_points.shape[0] == 0:
        return None
    panels = [s for s in result.methods if s.kind == "model" and s.points is not None]
    if not panels:
        return None
    ref = result.reference_points
    classes = sorted(set(result.reference_labels or []))
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    color = {c: cmap(i % 20) for i, c in enumerate(classes)}
    fig, axes = _figure(len(panels), (4.2, 3.8))
    for ax, score in zip(axes, panels, strict=True):
        ax.scatter(ref[:, 0], ref[:, 1], s=8, c="lightgrey", label="real cells", linewidths=0)
        pts = score.points if score.points is not None else np.zeros((0, 2))
        labels = score.point_labels or []
        for cls in classes:
            mask = np.asarray([lab == cls for lab in labels], dtype=bool)
            if mask.any():
                ax.scatter(pts[mask, 0], pts[mask, 1], s=14, color=color[cls], label=cls, linewidths=0)
        if pts.shape[0] == 0:
            ax.text(0.5, 0.5, "no valid generated cell", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(f"{score.name}: {pts.shape[0]} generated", fontsize=9)
        ax.set_xlabel("PC1 (real cells)", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
        if len(classes) <= max_legend:
            ax.legend(fontsize=6, markerscale=1.2, loc="best")
    fig.savefig(path, dpi=110)
    return path


def plot_pearson_delta(result: TaskResult, path: Path, limit: int = 40) -> Path | None:
    """Per-perturbation Pearson Δ (all genes), one bar per method; missing bars are unmeasurable."""
    groups = list(result.info.get("perturbations") or [])[:limit]
    methods = [s for s in result.methods if s.per_condition and s.kind != "ceiling"]
    ceiling = next((s for s in result.methods if s.kind == "ceiling"), None)
    if not groups or not methods:
        return None
    from matplotlib.figure import Figure

    height = 1.5 + len(groups) * (0.1 + 0.07 * len(methods))
    fig = Figure(figsize=(8.0, height), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    y = np.arange(len(groups))
    for k, score in enumerate(methods):
        values = [score.per_condition.get(g, {}).get("pearson_delta", float("nan")) for g in groups]
        ax.barh(
            y + k * width - 0.4 + width / 2, np.nan_to_num(values, nan=0.0), height=width, label=score.name
        )
    if ceiling is not None:
        values = [ceiling.per_condition.get(g, {}).get("pearson_delta", float("nan")) for g in groups]
        ax.scatter(values, y, marker="|", s=120, color="black", label=ceiling.name, zorder=3)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(y, groups, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Pearson Δ, all genes (missing bar = not measurable)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def write_plots(tasks: Mapping[str, TaskResult], out: Path) -> dict[str, list[str]]:
    """Every plot the report embeds, as paths relative to ``out``."""
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    for name, result in tasks.items():
        paths: list[Path | None] = []
        if result.labels:
            paths.append(plot_confusions(result, folder / f"confusion_{_slug(name)}.png"))
        if name in ("generation", "perturbation"):
            paths.append(plot_pca(result, folder / f"pca_{_slug(name)}.png"))
        if name == "perturbation":
            paths.append(plot_pearson_delta(result, folder / "pearson_delta_per_perturbation.png"))
        made[name] = [str(p.relative_to(out)) for p in paths if p is not None]
    return made


def write_report(
    tasks: Mapping[str, TaskResult], info: Mapping[str, Any], out: str | Path, plots: bool = True
) -> dict[str, Path]:
    """Write ``metrics.json``, the plots and ``report.md`` into ``out``; return their paths."""
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
    "fmt",
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
