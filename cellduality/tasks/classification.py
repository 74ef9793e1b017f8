"""Classification tasks: cell type annotation and drug sensitivity.

Both show a full cell sentence and ask for one label from a candidate list. Each row also carries the
split of that sentence into visible and hidden genes, which its dual (in-painting the hidden genes from
the visible ones and the *predicted* label) needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from cellduality.data.schema import RESISTANT, SENSITIVE, Columns
from cellduality.tasks.common import (
    TaskConfig,
    example_rng,
    hide_genes,
    join_candidates,
    join_genes,
    messages,
    opaque_id,
    pick,
    record,
    shuffled,
)
from cellduality.tasks.templates import ANNOTATION, DRUG_SENSITIVITY


def context_text(obs_row: pd.Series, columns: Sequence[str]) -> str:
    """Context values (cell line, donor, ...) as ``column: value`` pairs."""
    return ", ".join(f"{c.replace('_', ' ')}: {obs_row[c]}" for c in columns)


def context_texts(obs: pd.DataFrame, cells: np.ndarray, columns: Sequence[str]) -> list[str]:
    """:func:`context_text` of each cell in ``cells`` (positions into ``obs``), read column by column:
    a row of a DataFrame costs tens of microseconds, which an atlas pays once per example."""
    if not columns:
        return [""] * len(cells)
    values = [obs[c].iloc[cells].tolist() for c in columns]
    names = [c.replace("_", " ") for c in columns]
    return [
        ", ".join(f"{n}: {v}" for n, v in zip(names, row, strict=True)) for row in zip(*values, strict=True)
    ]


def annotation_rows(
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
    closed: bool = False,
) -> list[dict]:
    """One annotation example per cell in ``cells`` (positions into ``obs``/``sentences``).

    ``pool``: the candidate labels (the training split's; default all labels of ``cells``); a cell
    whose own label is missing from it gets it added, so every question is answerable, unless
    ``closed`` (the RL pool: a prompt must not depend on its cell's label). ``gene_scores``:
    which genes the in-painting dual hides (:func:`cellduality.tasks.common.hide_genes`).
    """
    labels = obs[columns.cell_type].astype(str)
    candidates = sorted(pool) if pool is not None else sorted(labels.iloc[cells].unique())
    known = set(candidates)
    ids = obs.index[cells].astype(str).tolist()
    own_labels = labels.iloc[cells].tolist()
    contexts = context_texts(obs, cells, columns.context)
    rows = []
    for k, i in enumerate(np.asarray(cells).tolist()):
        cell_id, own = ids[k], own_labels[k]
        rows.append(
            annotation_example(
                cell_id,
                sentences[i],
                candidates if closed or own in known else sorted([*candidates, own]),
                cfg,
                dataset,
                split=split,
                context=contexts[k],
                gene_scores=gene_scores,
                answer=own,
                stored_id=opaque_id(cfg.seed, dataset, "annotation", split, cell_id),
            )
        )
    return rows


def annotation_example(
    cell_id: str,
    sentence: Sequence[str],
    candidates: Sequence[str],
    cfg: TaskConfig,
    dataset: str,
    *,
    split: str,
    context: str = "",
    gene_scores: Mapping[str, float] | None = None,
    answer: str = "",
    stored_id: str | None = None,
) -> dict:
    """The annotation example of one cell: the one place its prompt, candidate order and hidden genes are
    drawn (seeded by ``dataset/annotation/split/cell_id``), for the builder and for ``predict`` alike.

    ``candidates`` in the order to shuffle from (the builder's sorted pool); ``stored_id``: the row's
    ``id`` (default the seeding key itself, as ``predict`` stores it).
    """
    key = f"{dataset}/annotation/{split}/{cell_id}"
    rng = example_rng(cfg.seed, key)
    sentence = list(sentence)[: cfg.top_k]
    visible, hidden = hide_genes(rng, sentence, cfg.hidden_fraction, gene_scores)
    cands = shuffled(rng, list(candidates))
    prompt = pick(rng, ANNOTATION).format(
        cell=join_genes(sentence),
        candidates=join_candidates(cands),
        context=f"Context: {context}. " if context else "",
    )
    return record(
        id=stored_id or key,
        task="annotation",
        prompt=messages(prompt),
        answer=answer,
        candidates=cands,
        cell_genes=sentence,
        visible_genes=visible,
        hidden_genes=hidden,
        n_genes=len(hidden),
        context=context,
        cell_id=cell_id,
        dataset=dataset,
    )


def response_labels(obs: pd.DataFrame, columns: Columns) -> pd.Series:
    """Map the response column onto ``sensitive`` / ``resistant``, refusing other values."""
    raw = obs[columns.response].astype(str)
    mapping = {str(columns.sensitive_value): SENSITIVE, str(columns.resistant_value): RESISTANT}
    unknown = sorted(set(raw) - set(mapping))
    if unknown:
        from cellduality.data.schema import DataError

        raise DataError(
            f"response column {columns.response!r} has values {unknown} that are neither the sensitive "
            f"value {columns.sensitive_value!r} nor the resistant value {columns.resistant_value!r}; "
            "set --sensitive-value / --resistant-value"
        )
    return raw.map(mapping)


def drug_sensitivity_rows(
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
    """One drug-sensitivity example per cell: cell + drug -> sensitive / resistant.

    ``pool`` is accepted for a uniform builder signature; the candidates are always both responses.
    """
    labels = response_labels(obs, columns).iloc[cells].tolist()
    drugs = obs[columns.drug].astype(str).iloc[cells].tolist()
    ids = obs.index[cells].astype(str).tolist()
    ctx_values = [[str(v) for v in obs[c].iloc[cells].tolist()] for c in columns.context]
    contexts = context_texts(obs, cells, columns.context)
    rows = []
    for k in range(len(ids)):
        cell_id, i = ids[k], int(cells[k])
        rng = example_rng(cfg.seed, f"{dataset}/drug_sensitivity/{split}/{cell_id}")
        sentence = list(sentences[i])[: cfg.top_k]
        visible, hidden = hide_genes(rng, sentence, cfg.hidden_fraction, gene_scores)
        cands = shuffled(rng, [SENSITIVE, RESISTANT])
        prompt = pick(rng, DRUG_SENSITIVITY).format(
            cell=join_genes(sentence),
            drug=drugs[k],
            candidates=" or ".join(cands),
            context="".join(f"{values[k]} " for values in ctx_values),
        )
        rows.append(
            record(
                id=opaque_id(cfg.seed, dataset, "drug_sensitivity", split, cell_id),
                task="drug_sensitivity",
                prompt=messages(prompt),
                answer=labels[k],
                candidates=cands,
                condition=drugs[k],
                condition_text=drugs[k],
                cell_genes=sentence,
                visible_genes=visible,
                hidden_genes=hidden,
                n_genes=len(hidden),
                context=contexts[k],
                cell_id=cell_id,
                dataset=dataset,
            )
        )
    return rows
