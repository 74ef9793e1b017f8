"""Classification tasks: cell type annotation and drug sensitivity.

Both show a full cell sentence and ask for one label from a candidate list. Each row also carries the
split of that sentence into visible and hidden genes, which its dual (in-painting the hidden genes from
the visible ones and the *predicted* label) needs.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from cellduality.data.schema import RESISTANT, SENSITIVE, Columns
from cellduality.sentences import Sentences, gene_lists
from cellduality.tasks import draws
from cellduality.tasks.columns import (
    SCHEMA,
    format_column,
    join_lists,
    prompt_column,
    record_table,
    strings,
    take_lists,
)
from cellduality.tasks.common import (
    TaskConfig,
    example_rng,
    hide_genes,
    join_candidates,
    join_genes,
    messages,
    opaque_ids,
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


def candidate_rows(
    candidates: Sequence[str], own: Sequence[str], extend: np.ndarray
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Each example's candidate list, in the order it is shuffled from, as indices into one vocabulary:
    ``candidates`` (sorted), or, where ``extend``, ``sorted([*candidates, own])`` (its own label added
    where sorting puts it). Returns the vocabulary, the (examples x width) indices and the lengths."""
    extra = sorted({label for label, e in zip(own, extend.tolist(), strict=True) if e})
    vocabulary = strings([*candidates, *extra])
    m = len(candidates)
    index = np.tile(np.arange(m + 1, dtype=np.int64), (len(own), 1))
    index[:, m] = -1
    rows = np.flatnonzero(extend)
    if rows.size:
        labels = [own[r] for r in rows.tolist()]
        at = np.fromiter(
            (bisect.bisect(candidates, label) for label in labels), dtype=np.int64, count=rows.size
        )
        code = m + np.searchsorted(np.asarray(extra, dtype=object), np.asarray(labels, dtype=object))
        shifted = np.arange(m + 1)[None, :] > at[:, None]
        index[rows] = np.where(shifted, np.arange(m + 1)[None, :] - 1, np.arange(m + 1)[None, :])
        index[rows, at] = code
    return vocabulary, index, np.where(extend, m + 1, m).astype(np.int64)


def hidden_counts(lengths: np.ndarray, fraction: float) -> np.ndarray:
    """How many genes ``hide_genes`` hides of sentences of these lengths (0 below two genes)."""
    table = np.array(
        [
            min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
            for n in range(int(lengths.max(initial=0)) + 1)
        ]
    )
    return table[lengths].astype(np.int64)


def sentence_columns(
    sentences: Sentences,
    cells: np.ndarray,
    keys: Sequence[str] | draws.PrefixedKeys,
    cfg: TaskConfig,
    gene_scores: Mapping[str, float] | None,
    after: Sequence[tuple[int, np.ndarray]],
) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray, list[np.ndarray]]:
    """What a classification example draws, for every example: its sentence (top ``cfg.top_k``), the
    split into visible and hidden genes (``hide_genes``), then the draws ``after`` names (op, per-example
    argument). Returns the cell, visible and hidden gene columns, the hidden counts and ``after``'s
    draws."""
    genes, lengths = sentences.rows(cells, cfg.top_k)
    n_hidden = hidden_counts(lengths, cfg.hidden_fraction)
    program = [draws.HIDE, *(op for op, _ in after)]
    params = np.stack([lengths, *(arg for _, arg in after)], axis=1)
    results, hidden = draws.run_program(
        cfg.seed,
        keys,
        program,
        params,
        genes=genes,
        lengths=lengths,
        scores=sentences.score_array(gene_scores),
        n_hidden=n_hidden,
    )
    names = sentences.arrow_names()
    return (
        gene_lists(names, genes, lengths),
        gene_lists(names, genes, lengths, ~hidden),
        gene_lists(names, genes, lengths, hidden),
        n_hidden,
        results[1:],
    )


def annotation_rows(
    obs: pd.DataFrame,
    sentences: Sentences,
    cells: np.ndarray,
    columns: Columns,
    dataset: str,
    split: str,
    cfg: TaskConfig,
    *,
    pool: Sequence[str] | None = None,
    gene_scores: Mapping[str, float] | None = None,
    closed: bool = False,
) -> pa.Table:
    """One annotation example per cell in ``cells`` (positions into ``obs``/``sentences``), as a record
    table: the rows :func:`annotation_example` gives, built column by column.

    ``pool``: the candidate labels (the training split's; default all labels of ``cells``); a cell
    whose own label is missing from it gets it added, so every question is answerable, unless
    ``closed`` (the RL pool: a prompt must not depend on its cell's label). ``gene_scores``:
    which genes the in-painting dual hides (:func:`cellduality.tasks.common.hide_genes`).
    """
    labels = obs[columns.cell_type].astype(str)
    candidates = sorted(pool) if pool is not None else sorted(labels.iloc[cells].unique())
    known = set(candidates)
    ids = obs.index[cells].astype(str).tolist()
    own = labels.iloc[cells].tolist()
    contexts = context_texts(obs, cells, columns.context)
    extend = (
        np.zeros(len(ids), dtype=bool)
        if closed
        else np.array([label not in known for label in own], dtype=bool)
    )
    vocabulary, index, m = candidate_rows(candidates, own, extend)
    keys = draws.PrefixedKeys(f"{dataset}/annotation/{split}/", ids)
    cell, visible, hidden, n_hidden, (perm, template) = sentence_columns(
        sentences,
        cells,
        keys,
        cfg,
        gene_scores,
        [(draws.PERMUTE, m), (draws.INTEGER, np.full(len(ids), len(ANNOTATION)))],
    )
    cands = take_lists(vocabulary, np.take_along_axis(index, np.maximum(perm, 0), axis=1), m)
    prompt = format_column(
        ANNOTATION,
        template[:, 0],
        {
            "cell": join_lists(cell, " "),
            "candidates": join_lists(cands, ", "),
            "context": strings([f"Context: {c}. " if c else "" for c in contexts]),
        },
    )
    return record_table(
        len(ids),
        SCHEMA,
        id=opaque_ids(cfg.seed, dataset, "annotation", split, ids),
        task="annotation",
        prompt=prompt_column(prompt),
        answer=strings(own),
        candidates=cands,
        cell_genes=cell,
        visible_genes=visible,
        hidden_genes=hidden,
        n_genes=pa.array(n_hidden, type=pa.int32()),
        context=strings(contexts),
        cell_id=strings(ids),
        dataset=dataset,
    )


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
    sentences: Sentences,
    cells: np.ndarray,
    columns: Columns,
    dataset: str,
    split: str,
    cfg: TaskConfig,
    *,
    pool: Sequence[str] | None = None,
    gene_scores: Mapping[str, float] | None = None,
) -> pa.Table:
    """One drug-sensitivity example per cell: cell + drug -> sensitive / resistant, as a record table.

    Seeded per example by ``dataset/drug_sensitivity/split/cell_id``: the hidden genes, the order of
    the two candidates, the template. ``pool`` is accepted for a uniform builder signature; the
    candidates are always both responses.
    """
    labels = response_labels(obs, columns).iloc[cells].tolist()
    drugs = obs[columns.drug].astype(str).iloc[cells].tolist()
    ids = obs.index[cells].astype(str).tolist()
    ctx_values = [[str(v) for v in obs[c].iloc[cells].tolist()] for c in columns.context]
    contexts = context_texts(obs, cells, columns.context)
    n = len(ids)
    keys = draws.PrefixedKeys(f"{dataset}/drug_sensitivity/{split}/", ids)
    cell, visible, hidden, n_hidden, (perm, template) = sentence_columns(
        sentences,
        cells,
        keys,
        cfg,
        gene_scores,
        [(draws.PERMUTE, np.full(n, 2)), (draws.INTEGER, np.full(n, len(DRUG_SENSITIVITY)))],
    )
    cands = take_lists(strings([SENSITIVE, RESISTANT]), perm, np.full(n, 2))
    drug_column = strings(drugs)
    prompt = format_column(
        DRUG_SENSITIVITY,
        template[:, 0],
        {
            "cell": join_lists(cell, " "),
            "drug": drug_column,
            "candidates": join_lists(cands, " or "),
            "context": strings(["".join(f"{values[k]} " for values in ctx_values) for k in range(n)]),
        },
    )
    return record_table(
        n,
        SCHEMA,
        id=opaque_ids(cfg.seed, dataset, "drug_sensitivity", split, ids),
        task="drug_sensitivity",
        prompt=prompt_column(prompt),
        answer=strings(labels),
        candidates=cands,
        condition=drug_column,
        condition_text=drug_column,
        cell_genes=cell,
        visible_genes=visible,
        hidden_genes=hidden,
        n_genes=pa.array(n_hidden, type=pa.int32()),
        context=strings(contexts),
        cell_id=strings(ids),
        dataset=dataset,
    )
