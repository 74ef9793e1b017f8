"""Generation tasks: conditional cell generation (type -> cell) and perturbation response.

Both answer with a cell sentence. Their duals reconstruct the condition from the generated cell among
``candidates``: the cell type for generation, the perturbation (control included) for perturbation
response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from cellduality.data.schema import Columns, DataError
from cellduality.sentences import Sentences, gene_lists
from cellduality.tasks import draws
from cellduality.tasks.classification import candidate_rows, context_texts
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
    join_genes,
    messages,
    opaque_id,
    opaque_ids,
    pick,
    record,
    shuffled,
)
from cellduality.tasks.templates import GENERATION, PERTURBATION


def generation_rows(
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
    """One example per cell: its type -> its sentence (the sentence is the oracle reference), as a
    record table: the rows :func:`generation_example` gives, built column by column.

    ``pool``: the dual's candidate types (the training split's; the row's own type is added if absent).
    """
    labels = obs[columns.cell_type].astype(str)
    candidates = sorted(pool) if pool is not None else sorted(labels.iloc[cells].unique())
    known = set(candidates)
    ids = obs.index[cells].astype(str).tolist()
    own = labels.iloc[cells].tolist()
    extend = np.array([label not in known for label in own], dtype=bool)
    vocabulary, index, m = candidate_rows(candidates, own, extend)
    keys = draws.PrefixedKeys(f"{dataset}/generation/{split}/", ids)
    genes, lengths = sentences.rows(cells, cfg.answer_genes)
    answer = join_lists(gene_lists(sentences.arrow_names(), genes, lengths), " ")
    return _generation_table(
        keys,
        opaque_ids(cfg.seed, dataset, "generation", split, ids),
        strings(own),
        vocabulary,
        index,
        m,
        cfg,
        dataset,
        answer=answer,
        cell_id=strings(ids),
    )


def generation_prompts(
    obs: pd.DataFrame, cells: np.ndarray, dataset: str, cfg: TaskConfig, pool: Sequence[str] | None
) -> pa.Table:
    """The RL pool's generation prompts: one per pool cell, each asking for a type of the SFT set
    (``pool``) drawn from the cell's seeded stream, never the cell's own type: a prompt reads no label of
    the pool, so permuting the pool's labels leaves every prompt as it was. No answer: the oracle
    scores a generated cell against the pool's real cells (``rl_reference``)."""
    candidates = sorted(pool or [])
    if not candidates:
        return record_table(0, SCHEMA)
    ids = obs.index[cells].astype(str).tolist()
    keys = opaque_ids(cfg.seed, dataset, "generation", "rl", ids)
    n = len(keys)
    (drawn,), _ = draws.run_program(cfg.seed, keys, [draws.INTEGER], np.full((n, 1), len(candidates)))
    vocabulary = strings(candidates)
    conditions = vocabulary.take(pa.array(drawn[:, 0]))
    index = np.tile(np.arange(len(candidates), dtype=np.int64), (n, 1))
    return _generation_table(
        [f"{dataset}/generation/rl/{key}" for key in keys],
        keys,
        conditions,
        vocabulary,
        index,
        np.full(n, len(candidates), dtype=np.int64),
        cfg,
        dataset,
    )


def _generation_table(
    keys: Sequence[str] | draws.PrefixedKeys,
    ids: Sequence[str],
    conditions: pa.Array,
    vocabulary: pa.Array,
    index: np.ndarray,
    m: np.ndarray,
    cfg: TaskConfig,
    dataset: str,
    **extra: pa.Array,
) -> pa.Table:
    """Generation records of :func:`generation_example`, seeded by ``keys`` (its ``rid``s): the
    template, then the order of each row's candidates (``vocabulary[index[r, :m[r]]]``)."""
    n = len(keys)
    n_genes = cfg.answer_genes
    (template, perm), _ = draws.run_program(
        cfg.seed, keys, [draws.INTEGER, draws.PERMUTE], np.stack([np.full(n, len(GENERATION)), m], axis=1)
    )
    prompt = format_column(GENERATION, template[:, 0], {"condition": conditions, "n": n_genes})
    return record_table(
        n,
        SCHEMA,
        id=list(ids),
        task="generation",
        prompt=prompt_column(prompt),
        candidates=take_lists(vocabulary, np.take_along_axis(index, np.maximum(perm, 0), axis=1), m),
        condition=conditions,
        condition_text=conditions,
        n_genes=n_genes,
        dataset=dataset,
        **extra,
    )


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
    """Per cell, its context values joined by ``|`` (the key control cells are matched on).

    Joined column by column (a row-wise ``agg`` costs microseconds per cell, seconds on an atlas);
    the same strings as ``obs[context].astype(str).agg("|".join, axis=1)``.
    """
    if not columns.context:
        return np.zeros(len(obs), dtype=object)
    parts = [obs[c].astype(str).to_numpy(dtype=object) for c in columns.context]
    keys = parts[0].copy()
    for part in parts[1:]:
        keys = keys + "|" + part
    return keys


@dataclass
class PerturbationPlan:
    """What every perturbation example of one split draws from, fixed before any row is built.

    Built once from the whole split (:func:`perturbation_plan`), so that rows can then be built for any
    chunk of its cells (:meth:`rows`) and come out as they would in one call over all of them.
    """

    conditions: np.ndarray
    is_control: np.ndarray
    contexts: np.ndarray
    controls_by_context: dict[object, np.ndarray]
    any_controls: np.ndarray
    perturbations_by_context: dict[object, list[str]]
    split: str
    #: per (context, perturbation) of the pool, a pool cell of it (its direction and dose name the
    #: perturbation in RL prompts, which have no perturbed cell of their own)
    pool_cells: dict[tuple[object, str], int] | None = None

    def perturbed(self, cells: np.ndarray) -> np.ndarray:
        """The cells of ``cells`` that get an example: those that are not controls, in order."""
        cells = np.asarray(cells, dtype=np.int64)
        return cells[~self.is_control[cells]]

    def rows(
        self,
        obs: pd.DataFrame,
        sentences: Sentences,
        cells: np.ndarray,
        columns: Columns,
        dataset: str,
        cfg: TaskConfig,
    ) -> pa.Table:
        """The examples of the perturbed cells among ``cells`` (positions into ``obs``/``sentences``),
        as a record table. Seeded per example by ``dataset/perturbation/split/cell_id``: the control
        cell (of the same context), the dual's candidates (:func:`perturbation_candidates`), the
        template."""
        split = self.split
        n = cfg.answer_genes
        cells = self.perturbed(cells)
        ids = obs.index[cells].astype(str).tolist()
        directions = obs[columns.direction].iloc[cells].astype(str).tolist() if columns.direction else None
        doses = obs[columns.dose].iloc[cells].astype(str).tolist() if columns.dose else None
        ctx_texts = context_texts(obs, cells, columns.context)
        keys = [f"{dataset}/perturbation/{split}/{cell_id}" for cell_id in ids]
        pools = [self.controls_by_context[self.contexts[i]] for i in cells.tolist()]
        pools = [p if p.size else self.any_controls for p in pools]
        conditions = self.conditions[cells].tolist()
        others = [
            [p for p in self.perturbations_by_context[self.contexts[i]] if p != c]
            for i, c in zip(cells.tolist(), conditions, strict=True)
        ]
        (control_at, _, _, template), candidates = _perturbation_draws(
            keys, others, conditions, str(columns.control_value), cfg, pools=[p.size for p in pools]
        )
        controls = np.array(
            [int(p[k]) for p, k in zip(pools, control_at[:, 0].tolist(), strict=True)], dtype=np.int64
        )
        texts = [
            perturbation_text(c, columns, directions[k] if directions else None, doses[k] if doses else None)
            for k, c in enumerate(conditions)
        ]
        control_genes = sentences.arrow(controls, cfg.top_k) if cells.size else _empty_lists()
        answer = join_lists(sentences.arrow(cells, n), " ") if cells.size else strings([])
        text_column = strings(texts)
        prompt = format_column(
            PERTURBATION,
            template[:, 0],
            {
                "cell": join_lists(control_genes, " "),
                "condition_text": text_column,
                "n": n,
                "context": strings([f" ({c})" if c else "" for c in ctx_texts]),
            },
        )
        return record_table(
            len(ids),
            SCHEMA,
            id=opaque_ids(cfg.seed, dataset, "perturbation", split, ids),
            task="perturbation",
            prompt=prompt_column(prompt),
            answer=answer,
            candidates=candidates,
            condition=strings(conditions),
            condition_text=text_column,
            cell_genes=control_genes,
            n_genes=n,
            context=strings(ctx_texts),
            cell_id=strings(ids),
            dataset=dataset,
        )

    def rl_rows(
        self,
        obs: pd.DataFrame,
        sentences: Sentences,
        cells: np.ndarray,
        columns: Columns,
        dataset: str,
        cfg: TaskConfig,
    ) -> pa.Table:
        """The RL pool's prompts: each control cell of ``cells`` with each perturbation the SFT set has in
        its context, as a record table (the rows :func:`perturbation_example` gives). No perturbed cell
        and no answer: the oracle compares a generated cell with the pool's perturbed cells of that
        perturbation (``rl_reference``)."""
        cells = np.asarray(cells, dtype=np.int64)
        cells = cells[self.is_control[cells]]
        ids = obs.index[cells].astype(str).tolist()
        ctx_texts = context_texts(obs, cells, columns.context)
        texts: dict[tuple[object, str], str] = {}
        row_cell, row_condition, row_text, row_others, keys = [], [], [], [], []
        for k, i in enumerate(cells.tolist()):
            ctx_key = self.contexts[i]
            perturbations = self.perturbations_by_context[ctx_key]
            for condition in perturbations:
                if (ctx_key, condition) not in texts:
                    example = self.pool_cells[(ctx_key, condition)] if self.pool_cells else None
                    texts[(ctx_key, condition)] = perturbation_text(
                        condition,
                        columns,
                        str(obs[columns.direction].iloc[example])
                        if columns.direction and example is not None
                        else None,
                        str(obs[columns.dose].iloc[example])
                        if columns.dose and example is not None
                        else None,
                    )
                row_cell.append(k)
                row_condition.append(condition)
                row_text.append(texts[(ctx_key, condition)])
                row_others.append([p for p in perturbations if p != condition])
                keys.append(opaque_id(cfg.seed, dataset, "perturbation", "rl", f"{ids[k]}|{condition}"))
        if not keys:
            return record_table(0, SCHEMA)
        (_, _, template), candidates = _perturbation_draws(
            keys, row_others, row_condition, str(columns.control_value), cfg
        )
        rows = np.asarray(row_cell, dtype=np.int64)
        control_genes = sentences.arrow(cells[rows], cfg.top_k)
        contexts = [ctx_texts[k] for k in row_cell]
        text_column = strings(row_text)
        prompt = format_column(
            PERTURBATION,
            template[:, 0],
            {
                "cell": join_lists(control_genes, " "),
                "condition_text": text_column,
                "n": cfg.answer_genes,
                "context": strings([f" ({c})" if c else "" for c in contexts]),
            },
        )
        return record_table(
            len(keys),
            SCHEMA,
            id=keys,
            task="perturbation",
            prompt=prompt_column(prompt),
            candidates=candidates,
            condition=strings(row_condition),
            condition_text=text_column,
            cell_genes=control_genes,
            n_genes=cfg.answer_genes,
            context=strings(contexts),
            dataset=dataset,
        )


def _empty_lists() -> pa.Array:
    return pa.array([], type=pa.list_(pa.string()))


def _perturbation_draws(
    keys: Sequence[str],
    others: Sequence[Sequence[str]],
    conditions: Sequence[str],
    control_value: str,
    cfg: TaskConfig,
    *,
    pools: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], pa.Array]:
    """The draws of perturbation examples seeded by ``keys``: (with ``pools``, a control cell among
    ``pools[e]``), :func:`perturbation_candidates` (``others``: each example's other perturbations),
    then the template. Returns the draws and the candidates column."""
    n = len(keys)
    n_others = np.array([len(o) for o in others], dtype=np.int64)
    size = np.minimum(n_others, max(0, cfg.max_candidates - 2))
    program = [draws.CHOICE, draws.PERMUTE, draws.INTEGER]
    params = [n_others, size + 2, np.full(n, len(PERTURBATION))]
    sizes = [size, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)]
    if pools is not None:
        program.insert(0, draws.INTEGER)
        params.insert(0, np.asarray(pools, dtype=np.int64))
        sizes.insert(0, np.zeros(n, dtype=np.int64))
    results, _ = draws.run_program(cfg.seed, keys, program, np.stack(params, axis=1), np.stack(sizes, axis=1))
    picked, perm = results[-3], results[-2]
    lists = []
    for e in range(n):
        listed = [conditions[e], control_value, *(others[e][j] for j in picked[e, : size[e]].tolist())]
        lists.append([listed[j] for j in perm[e, : size[e] + 2].tolist()])
    return results, pa.array(lists, type=pa.list_(pa.string()))


def perturbation_example(
    rid: str,
    control_genes: Sequence[str],
    condition: str,
    condition_text: str,
    others: Sequence[str],
    control_value: str,
    cfg: TaskConfig,
    dataset: str,
    *,
    context: str = "",
    cell_id: str = "",
) -> dict:
    """A "this control cell after that perturbation" example with no answer, seeded by its id ``rid``:
    the RL pool's prompts and ``cellduality predict``'s, the dual's candidates as in training (the
    perturbation, the control and up to ``max_candidates - 2`` of ``others``)."""
    rng = example_rng(cfg.seed, rid)
    n = cfg.answer_genes
    candidates = perturbation_candidates(rng, condition, str(control_value), others, cfg)
    cell = list(control_genes)[: cfg.top_k]
    prompt = pick(rng, PERTURBATION).format(
        cell=join_genes(cell), condition_text=condition_text, n=n, context=f" ({context})" if context else ""
    )
    return record(
        id=rid,
        task="perturbation",
        prompt=messages(prompt),
        candidates=candidates,
        condition=condition,
        condition_text=condition_text,
        cell_genes=cell,
        n_genes=n,
        context=context,
        cell_id=cell_id,
        dataset=dataset,
    )


def perturbation_plan(
    obs: pd.DataFrame,
    cells: np.ndarray,
    columns: Columns,
    split: str,
    pool: Sequence[int] | None = None,
) -> PerturbationPlan:
    """The control cells per context of the split's ``cells`` and the training perturbations per context
    (``pool``: positions of the training cells; default ``cells``); refuses a split without controls."""
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
    in_split[np.asarray(cells, dtype=int)] = True
    unique_contexts = np.unique(contexts)
    controls_by_context: dict[object, np.ndarray] = {}
    for ctx in unique_contexts:
        controls_by_context[ctx] = np.flatnonzero(is_control & in_split & (contexts == ctx))
    any_controls = np.flatnonzero(is_control & in_split)
    if any_controls.size == 0:
        raise DataError(f"the {split} split has no control cell to condition on")
    in_pool = np.zeros(len(obs), dtype=bool)
    in_pool[np.asarray(pool if pool is not None else cells, dtype=int)] = True
    perturbations_by_context: dict[object, list[str]] = {
        ctx: sorted(set(conditions[(contexts == ctx) & ~is_control & in_pool])) for ctx in unique_contexts
    }
    pool_cells: dict[tuple[object, str], int] = {}
    for i in np.flatnonzero(in_pool & ~is_control).tolist():
        pool_cells.setdefault((contexts[i], conditions[i]), i)
    return PerturbationPlan(
        conditions,
        is_control,
        contexts,
        controls_by_context,
        any_controls,
        perturbations_by_context,
        split,
        pool_cells,
    )


def perturbation_rows(
    obs: pd.DataFrame,
    sentences: Sentences,
    cells: np.ndarray,
    columns: Columns,
    dataset: str,
    split: str,
    cfg: TaskConfig,
    *,
    pool: Sequence[int] | None = None,
    gene_scores: Mapping[str, float] | None = None,
) -> pa.Table:
    """One example per perturbed cell in ``cells``: a control cell of the same context + perturbation.

    Single-cell perturbation data are unpaired, so each perturbed cell is paired with a seeded random
    control cell from the same split and context (cell line, donor); its sentence is the reference.
    ``pool``: positions of the training split's cells; the dual's distractor perturbations are drawn
    from their perturbations only, so a held-out (OOD) perturbation never appears in a training prompt.
    """
    plan = perturbation_plan(obs, cells, columns, split, pool)
    return plan.rows(obs, sentences, cells, columns, dataset, cfg)
