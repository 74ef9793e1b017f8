"""Generation tasks: conditional cell generation (type -> cell) and perturbation response.

Both answer with a cell sentence. Their duals reconstruct the condition from the generated cell among
``candidates``: the cell type for generation, the perturbation (control included) for perturbation
response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cellduality.data.schema import Columns, DataError
from cellduality.tasks.classification import context_text
from cellduality.tasks.common import (
    TaskConfig,
    example_rng,
    join_genes,
    messages,
    opaque_id,
    pick,
    record,
    shuffled,
)
from cellduality.tasks.templates import GENERATION, PERTURBATION


def generation_rows(
    obs: pd.DataFrame,
    sentences: list[list[str]],
    cells: np.ndarray,
    columns: Columns,
    dataset: str,
    split: str,
    cfg: TaskConfig,
    *,
    pool: Sequence[str] | None = None,
    gene_scores: Mapping[str, float] | None = None,
) -> list[dict]:
    """One example per cell: its type -> its sentence (the sentence is the oracle reference).

    ``pool``: the dual's candidate types (the training split's; the row's own type is added if absent).
    """
    labels = obs[columns.cell_type].astype(str)
    candidates = sorted(pool) if pool is not None else sorted(labels.iloc[cells].unique())
    n = cfg.answer_genes
    rows = []
    for i in cells:
        cell_id = str(obs.index[i])
        label = labels.iloc[i]
        rows.append(
            generation_example(
                cell_id,
                label,
                candidates if label in candidates else sorted([*candidates, label]),
                cfg,
                dataset,
                split=split,
                answer=join_genes(sentences[i][:n]),
                cell_id=cell_id,
                stored_id=opaque_id(cfg.seed, dataset, "generation", split, cell_id),
            )
        )
    return rows


def generation_example(
    key: str,
    condition: str,
    candidates: Sequence[str],
    cfg: TaskConfig,
    dataset: str,
    *,
    split: str,
    answer: str = "",
    cell_id: str = "",
    stored_id: str | None = None,
) -> dict:
    """A "generate a cell of this type" example, seeded by ``dataset/generation/split/key``: the one
    place its prompt and the dual's candidate order are drawn, for the builder and ``predict`` alike
    (``stored_id``: the row's ``id``, default the seeding key itself)."""
    rid = f"{dataset}/generation/{split}/{key}"
    rng = example_rng(cfg.seed, rid)
    n = cfg.answer_genes
    return record(
        id=stored_id or rid,
        task="generation",
        prompt=messages(pick(rng, GENERATION).format(condition=condition, n=n)),
        answer=answer,
        candidates=shuffled(rng, list(candidates)),
        condition=condition,
        condition_text=condition,
        n_genes=n,
        cell_id=cell_id,
        dataset=dataset,
    )


def perturbation_text(condition: str, columns: Columns, direction_value: str | None, dose: str | None) -> str:
    """Words for a perturbation: ``overexpression (CRISPRa) of KLF1 and MAP2K6`` or a drug and dose."""
    if columns.perturbation_kind == "chemical":
        return f"treatment with {condition}" + (f" at {dose}" if dose else "")
    direction = (
        columns.direction_map.get(str(direction_value), str(direction_value)) if direction_value else ""
    )
    direction = direction or columns.default_direction
    targets = [t for t in condition.split("+") if t]
    return f"{direction} of {' and '.join(targets)}"


def perturbation_candidates(
    rng: np.random.Generator, condition: str, control: str, perturbations: Sequence[str], cfg: TaskConfig
) -> list[str]:
    """The dual's answer choices for one perturbation example, shuffled: the perturbation, the control
    and up to ``cfg.max_candidates - 2`` other perturbations of the same context, drawn without
    replacement. Shared by training rows and ``cellduality predict`` so both ask the same question."""
    others = [p for p in perturbations if p != condition]
    n_others = min(len(others), max(0, cfg.max_candidates - 2))
    picked = rng.choice(len(others), size=n_others, replace=False).tolist() if n_others else []
    return shuffled(rng, [condition, control, *[others[k] for k in picked]])


def _context_keys(obs: pd.DataFrame, columns: Columns) -> np.ndarray:
    if not columns.context:
        return np.zeros(len(obs), dtype=object)
    return obs[list(columns.context)].astype(str).agg("|".join, axis=1).to_numpy()


def perturbation_rows(
    obs: pd.DataFrame,
    sentences: list[list[str]],
    cells: np.ndarray,
    columns: Columns,
    dataset: str,
    split: str,
    cfg: TaskConfig,
    *,
    pool: Sequence[int] | None = None,
    gene_scores: Mapping[str, float] | None = None,
) -> list[dict]:
    """One example per perturbed cell in ``cells``: a control cell of the same context + perturbation.

    Single-cell perturbation data are unpaired, so each perturbed cell is paired with a seeded random
    control cell from the same split and context (cell line, donor); its sentence is the reference.
    ``pool``: positions of the training split's cells; the dual's distractor perturbations are drawn
    from their perturbations only, so a held-out (OOD) perturbation never appears in a training prompt.
    """
    conditions = obs[columns.perturbation].astype(str).to_numpy()
    is_control = conditions == str(columns.control_value)
    if not is_control.any():
        raise DataError(
            f"no control cell: no value of {columns.perturbation!r} equals the control value "
            f"{columns.control_value!r}; values present include {sorted(set(conditions))[:10]} "
            "(set --control-value)"
        )
    contexts = _context_keys(obs, columns)
    in_split = np.zeros(len(obs), dtype=bool)
    in_split[cells] = True
    controls_by_context: dict[object, np.ndarray] = {}
    for ctx in np.unique(contexts):
        controls_by_context[ctx] = np.flatnonzero(is_control & in_split & (contexts == ctx))
    any_controls = np.flatnonzero(is_control & in_split)
    if any_controls.size == 0:
        raise DataError(f"the {split} split has no control cell to condition on")
    in_pool = np.zeros(len(obs), dtype=bool)
    in_pool[np.asarray(pool if pool is not None else cells, dtype=int)] = True
    perturbations_by_context: dict[object, list[str]] = {
        ctx: sorted(set(conditions[(contexts == ctx) & ~is_control & in_pool])) for ctx in np.unique(contexts)
    }
    n = cfg.answer_genes
    rows = []
    for i in cells:
        if is_control[i]:
            continue
        cell_id = str(obs.index[i])
        rng = example_rng(cfg.seed, f"{dataset}/perturbation/{split}/{cell_id}")
        ctrl_pool = controls_by_context[contexts[i]]
        ctrl_pool = ctrl_pool if ctrl_pool.size else any_controls
        control = int(ctrl_pool[int(rng.integers(ctrl_pool.size))])
        condition = conditions[i]
        direction = str(obs.iloc[i][columns.direction]) if columns.direction else None
        dose = str(obs.iloc[i][columns.dose]) if columns.dose else None
        text = perturbation_text(condition, columns, direction, dose)
        candidates = perturbation_candidates(
            rng, condition, str(columns.control_value), perturbations_by_context[contexts[i]], cfg
        )
        ctx = context_text(obs.iloc[i], columns.context)
        prompt = pick(rng, PERTURBATION).format(
            cell=join_genes(sentences[control][: cfg.top_k]),
            condition_text=text,
            n=n,
            context=f" ({ctx})" if ctx else "",
        )
        rows.append(
            record(
                id=opaque_id(cfg.seed, dataset, "perturbation", split, cell_id),
                task="perturbation",
                prompt=messages(prompt),
                answer=join_genes(sentences[i][:n]),
                candidates=candidates,
                condition=condition,
                condition_text=text,
                cell_genes=sentences[control][: cfg.top_k],
                n_genes=n,
                context=ctx,
                cell_id=cell_id,
                dataset=dataset,
            )
        )
    return rows
