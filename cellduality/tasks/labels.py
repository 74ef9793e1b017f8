"""The labels a trained model may be asked about, recorded in the prepared meta (``meta['labels']``).

Prediction on a user's cells must show the model the same candidate lists and the same worded
perturbations it was trained with, without the training data at hand. Annotation and generation take
the union of the candidate lists their *training* examples showed; perturbations are worded from the
dataset's own columns (direction, dose) per cell context, as
:func:`cellduality.tasks.generative.perturbation_text` words them in training prompts, and ``trained``
lists those the training prompts named (a held-out perturbation is not among them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cellduality.data.loading import CellData
from cellduality.data.schema import DataError
from cellduality.tasks.classification import context_text
from cellduality.tasks.generative import perturbation_text


def candidate_union(rows: Iterable[Mapping[str, Any]], task: str) -> list[str]:
    """Sorted union of the candidate lists of ``task``'s examples."""
    found: set[str] = set()
    for row in rows:
        if row.get("task") == task:
            found.update(str(c) for c in row.get("candidates") or [])
    return sorted(found)


def perturbation_labels(data: CellData) -> dict[str, Any]:
    """Control value, contexts, and per perturbation the prompt's wording in each context it occurs in."""
    c = data.columns
    obs = data.adata.obs
    cols = [c.perturbation, *[x for x in (c.direction, c.dose) if x], *c.context]
    table = obs[list(dict.fromkeys(cols))].astype(str).drop_duplicates()
    conditions: dict[str, dict[str, str]] = {}
    contexts: set[str] = set()
    for _, row in table.iterrows():
        ctx = context_text(row, c.context)
        contexts.add(ctx)
        condition = row[c.perturbation]
        if condition == str(c.control_value):
            continue
        text = perturbation_text(
            condition, c, row[c.direction] if c.direction else None, row[c.dose] if c.dose else None
        )
        conditions.setdefault(condition, {}).setdefault(ctx, text)
    return {
        "control": str(c.control_value),
        "contexts": sorted(contexts),
        "conditions": dict(sorted(conditions.items())),
    }


def task_labels(
    rows: Iterable[Mapping[str, Any]],
    data: CellData,
    tasks: Iterable[str],
    split: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``meta['labels']`` from the training rows and the split (``meta['split']``: what was held out)."""
    rows = list(rows)
    out: dict[str, Any] = {}
    for task in tasks:
        if task in ("annotation", "generation"):
            out[task] = candidate_union(rows, task)
        elif task == "drug_sensitivity":
            out[task] = sorted({str(r["condition"]) for r in rows if r.get("task") == task})
        elif task == "perturbation":
            out[task] = perturbation_labels(data)
            held_out = set((split or {}).get(task, {}).get("holdout") or [])
            out[task]["trained"] = [c for c in out[task]["conditions"] if c not in held_out]
    return out


def labels_from_source(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Labels for a meta written before they were recorded: rebuilt from the dataset the meta names."""
    from cellduality.data.embedded import EMBEDDED, load_dataset
    from cellduality.data.schema import Columns

    source = dict(meta.get("source") or {})
    name = source.get("embedded") or (meta.get("dataset") if meta.get("dataset") in EMBEDDED else None)
    cols = dict(meta.get("columns") or {})
    cols["context"] = tuple(cols.get("context") or ())
    columns = Columns(**cols)
    options = {k: source.get(k) for k in ("layer", "gene_symbols")}
    if name in EMBEDDED:
        data = load_dataset(str(name), columns, **options)
    elif source.get("path"):
        data = load_dataset(
            str(source["path"]), columns, allow_scaled=meta.get("value_type") == "z-score", **options
        )
    else:
        raise DataError(
            f"the checkpoint's metadata for {meta.get('dataset')!r} records no candidate labels and no file "
            "to read them from: retrain with this version, or pass the candidates explicitly"
        )
    out: dict[str, Any] = {}
    obs = data.adata.obs
    for task in meta.get("tasks") or []:
        if task in ("annotation", "generation") and columns.cell_type:
            out[task] = sorted(obs[columns.cell_type].astype(str).unique())
        elif task == "perturbation" and columns.perturbation:
            out[task] = perturbation_labels(data)
    return out


__all__ = ["candidate_union", "labels_from_source", "perturbation_labels", "task_labels"]
