"""Labels that would make a task meaningless are refused before anything is built.

A label is what a completion must name between ``<answer>`` and ``</answer>``, and answers are compared
with the candidates by :func:`cellduality.parsing.normalize_label` (case, spacing and surrounding
punctuation ignored, then an exact match). Four kinds of label break that contract silently: training
runs, and every reward is wrong for those cells, so they are refused here, with the reason:

* **completion markup** inside a label (``B </answer> cell``): the answer ends early, so no completion
  can ever be parsed as naming it;
* a label that is **empty once normalised** (``"?"``, ``"..."``): no answer matches an empty label;
* labels that **differ only by case, spacing or punctuation** (``T cell`` / ``t  cell``): answers
  cannot tell them apart, so the second one can never be answered right;
* a class column with a **single class**: the classification task would list one candidate, and the
  generation dual would have nothing to tell apart; the rewards are constant.

Candidates that are prefixes of each other (``T cell`` / ``T cell activated``) are fine: the match is
exact after normalisation, never a prefix match (tested in ``tests/test_label_hygiene.py``).

Called from ``cellduality.data.loading._tidy_obs``, which both the in-memory and the block-wise
``prepare`` use, so the two paths refuse the same files with the same messages. A folder prepared
before these checks existed is checked when it is read (``check_prepared_labels``, from
``cellduality.tasks.load_prepared``): the same rules on the candidates its rows list, so ``sft``,
``grpo``, ``eval`` and ``dual-check`` refuse it with the reason instead of training on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from cellduality.data.schema import Columns, DataError
from cellduality.parsing import normalize_label

__all__ = ["MARKUP", "check_labels", "check_prepared_labels"]

#: the completion format's tags (``docs/contracts.md``), with any spacing or case a model might copy
MARKUP = re.compile(r"<\s*/?\s*(?:think|answer)\s*>", re.IGNORECASE)

#: how many offending values a message shows
SHOWN = 3


def _shown(values: Iterable[str]) -> str:
    values = list(values)
    more = f" (and {len(values) - SHOWN} more)" if len(values) > SHOWN else ""
    return ", ".join(repr(v) for v in values[:SHOWN]) + more


def check_labels(obs: pd.DataFrame, columns: Columns) -> None:
    """Raise ``DataError`` when a label column of ``obs`` holds labels no completion can name right.

    ``obs`` is tidied (labels stripped, missing ones ``""``, perturbations canonical); missing labels are
    left out (each task drops those cells). A drug is only ever shown in a prompt, never answered, so
    the drug column is not a label column here; the cell type, the response and the perturbation are.
    """
    label_columns = [
        (columns.cell_type, "cell type", True),
        (columns.response, "response", True),
        (columns.perturbation, "perturbation", False),
    ]
    for column, what, needs_two in label_columns:
        if not column or column not in obs.columns:
            continue
        values = obs[column].astype(str)
        present = values[values != ""]
        labels = [str(v) for v in pd.unique(present.to_numpy())]
        # one labelled cell (or none) is refused later, by the split, with its own reason
        _check_column(column, what, labels, needs_two and len(present) >= 2)


def check_prepared_labels(
    datasets: Mapping[str, Any],
    folder: str,
    classification_tasks: Sequence[str],
    generation_tasks: Sequence[str],
) -> None:
    """Raise ``DataError`` when a prepared folder's rows list candidates no completion can name right.

    Per task, the candidates of every row of every split (read through Arrow, without building Python
    rows). Classification tasks need two candidates; the generation tasks' candidates are their duals'.
    The task names come from the caller (``tasks.build``): this floor knows columns, not tasks.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = [ds.data.table for ds in datasets.values() if {"task", "candidates"} <= set(ds.column_names)]
    if not tables:
        return
    for task in (*classification_tasks, *generation_tasks):
        lists = [t.filter(pc.equal(t.column("task"), task)).column("candidates") for t in tables]
        flat = pa.chunked_array([pc.list_flatten(c) for c in lists if len(c)], type=pa.string())
        labels = [str(v) for v in pc.unique(flat).to_pylist() if v is not None]
        if labels:
            try:
                _check_column(task, "candidate", labels, task in classification_tasks, f"task {task!r}")
            except DataError as error:
                raise DataError(
                    f"{folder}: {error}; this folder was prepared before these labels were refused: prepare "
                    "it again from the source data (cellduality prepare)"
                ) from None


def _check_column(
    column: str, what: str, labels: list[str], needs_two: bool, where: str | None = None
) -> None:
    where = where or f"column {column!r}"
    marked = [v for v in labels if MARKUP.search(v)]
    if marked:
        raise DataError(
            f"{where} has {what} label(s) holding the completion markup (<think>, <answer>): "
            f"{_shown(marked)}; no answer could ever be parsed as naming them: rename them"
        )
    blank = [v for v in labels if not normalize_label(v)]
    if blank:
        raise DataError(
            f"{where} has {what} label(s) that are empty once case, spacing and punctuation are "
            f"ignored (as answers are compared): {_shown(blank)}; rename them, or set them to NaN to drop "
            "those cells"
        )
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(normalize_label(label), []).append(label)
    clashes = [sorted(g) for g in groups.values() if len(g) > 1]
    if clashes:
        pairs = "; ".join(" = ".join(repr(v) for v in group) for group in clashes[:SHOWN])
        raise DataError(
            f"{where} has {what} labels that differ only by case, spacing or punctuation, which "
            f"answers are compared without: {pairs}; merge them (one spelling each) before preparing"
        )
    if needs_two and len(labels) < 2:
        only = f" ({labels[0]!r})" if labels else ""
        raise DataError(
            f"{where} holds a single {what} class{only}: a task with one candidate teaches and "
            "measures nothing; name a column with at least two classes, or leave this task out"
        )
