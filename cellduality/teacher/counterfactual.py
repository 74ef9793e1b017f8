"""Counterfactual dual examples: the dual question asked with a *wrong* forward answer, answered right.

Why: an ordinary dual SFT example pairs the true label with visible genes that already imply it, so the
policy learns that the label in an in-painting prompt is redundant, and the dual reward then gives a
right and a wrong forward answer the same score (measured by ``cellduality dual-check``). A
counterfactual example shows the *same* visible genes with another candidate label and, as the target,
that label's typical hidden genes (the training profile of that label, minus the visible genes): the
only way to fit both is to read the label. For the reconstruction duals, a real training cell of
*another* condition (or, for perturbation, the unchanged control cell) is named by its true condition,
so the policy learns to name what a cell shows rather than a constant.

Every target comes from the training split (its labels, profiles and cells), as any SFT target does;
nothing here reaches a reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellduality.tasks.common import example_rng
from cellduality.tasks.dual import CLASSIFICATION_TASKS, control_cell_genes, dual_prompt, has_dual
from cellduality.teacher.offline import OfflineTeacher, completion, perturbation_rationale

COUNTERFACTUAL = "counterfactual"


def _control_value(meta: Mapping[str, Any], dataset: str) -> str:
    from cellduality.tasks.build import part_meta

    return str(part_meta(dict(meta), dataset)["columns"]["control_value"])


def counterfactual_examples(
    rows: Sequence[Mapping[str, Any]],
    train_rows: Sequence[Mapping[str, Any]],
    teacher: OfflineTeacher,
    meta: Mapping[str, Any],
    seed: int = 0,
    per_row: int = 1,
) -> list[dict[str, Any]]:
    """Up to ``per_row`` counterfactual dual examples per row, as SFT records (``kind='counterfactual'``).

    ``train_rows``: the training rows that supply real cells of other conditions; ``teacher``: the
    offline teacher fitted on the training split (its class profiles give in-painting targets).
    """
    by_condition: dict[tuple[str, str, str, str], list[str]] = {}
    for r in train_rows:
        if r["task"] in CLASSIFICATION_TASKS or not has_dual(r["task"]):
            continue
        key = (str(r["dataset"]), str(r["task"]), str(r.get("context", "")), str(r["condition"]))
        by_condition.setdefault(key, []).append(str(r["answer"]))
        if r["task"] == "perturbation":  # the control cells the rows are paired with: real cells of `control`
            ctrl = (*key[:3], _control_value(meta, str(r["dataset"])))
            cell = " ".join(control_cell_genes(r))
            if cell not in by_condition.setdefault(ctrl, []):
                by_condition[ctrl].append(cell)
    out: list[dict[str, Any]] = []
    for row in rows:
        if not has_dual(row["task"]):  # neighbourhood editing has no dual question to ask
            continue
        rng = example_rng(seed, f"counterfactual/{row['id']}")
        for k, kind in enumerate(_kinds(row, per_row)):
            made = _one(row, rng, teacher, by_condition, meta, kind)
            if made is None:
                continue
            answer, text = made
            out.append(
                {
                    "id": f"{row['id']}/{COUNTERFACTUAL}/{k}",
                    "task": row["task"],
                    "kind": COUNTERFACTUAL,
                    "prompt": dual_prompt(row, answer, seed=seed),
                    "completion": [{"role": "assistant", "content": text}],
                    "teacher": "counterfactual",
                    "dataset": row["dataset"],
                    "score": 1.0,
                }
            )
    return out


def _kinds(row: Mapping[str, Any], per_row: int) -> list[str]:
    """Which counterfactuals a row gets.

    Perturbation: cells that show each candidate, named by it: the row's own real perturbed cell and
    another training cell of its perturbation (``own``, ``other:<condition>``), the unchanged control cell
    (``control``: copying it is the failure the dual must catch) and a real training cell of every other
    candidate, the control value included (another control cell of the same context, so that `control`
    is named from what a cell shows, not only from a copy). No name is then favoured by the data (with
    the control cell alone plus one other, the policy learned to answer ``control`` to real perturbed
    cells: 27 of 48). Other tasks: ``per_row`` cells or labels of other conditions.
    """
    if row["task"] != "perturbation":
        return ["other"] * per_row
    return ["own", "control", *[f"other:{c}" for c in row["candidates"]]]


def _one(
    row: Mapping[str, Any],
    rng: np.random.Generator,
    teacher: OfflineTeacher,
    by_condition: Mapping[tuple[str, str, str, str], list[str]],
    meta: Mapping[str, Any],
    kind: str = "other",
) -> tuple[str, str] | None:
    """(forward answer the dual prompt is built from, the completion) or ``None`` when none fits."""
    task = str(row["task"])
    candidates = [str(c) for c in row["candidates"]]
    if task in CLASSIFICATION_TASKS:
        part = teacher.parts.get(str(row["dataset"]))
        known = set(part.classes[task].names) if part is not None and task in part.classes else set()
        others = [c for c in candidates if c != row["answer"] and c in known]  # labels with a profile
        if not others:
            return None
        label = others[int(rng.integers(len(others)))]
        return label, teacher.answer(row, dual_answer=label)
    dataset, context = str(row["dataset"]), str(row.get("context", ""))
    options: list[tuple[str, str]] = []  # (cell sentence, its true condition)
    paired = " ".join(control_cell_genes(row))
    if kind == "own":
        options.append((str(row["answer"]), str(row["condition"])))
    if task == "perturbation" and kind == "control":
        options.append((paired, _control_value(meta, dataset)))
    if kind.startswith("other:"):
        others = [kind.split(":", 1)[1]]
    else:
        others = [c for c in candidates if c != row["condition"]] if kind == "other" else []
    for cond in others:
        # another real cell: not the row's own perturbed cell, not its paired control cell
        cells = [
            c
            for c in by_condition.get((dataset, task, context, cond), [])
            if c not in (row["answer"], paired)
        ]
        if cells:
            options.append((cells[int(rng.integers(len(cells)))], cond))
    if not options:
        return None
    cell, truth = options[int(rng.integers(len(options)))]
    if truth not in candidates:
        return None
    if task == "perturbation":
        return cell, completion(perturbation_rationale(list(row["cell_genes"]), cell.split(), truth), truth)
    return cell, completion(f"the cell matches {truth}", truth)
