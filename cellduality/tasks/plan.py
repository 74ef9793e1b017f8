"""Which examples a preparation builds, decided from the obs table alone, before any row exists.

``plan_tasks`` takes every decision of ``build_tasks`` that reads labels: the cells each task can use,
the train/test split, the candidate pools, the ``--max-examples`` sample and the perturbation pairing
pools. It reads no expression, so the block-wise ``prepare`` plans an atlas, refuses a bad split, and
only then reads the matrix; and since an example depends only on the plan, its cell and the sentences,
:meth:`TaskPlan.rows` can build the rows of any chunk of cells and they come out as the rows of one
call over all of them (the in-memory path makes that one call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from cellduality.data.loading import CellData
from cellduality.data.perturbations import canonical_condition, missing_mask
from cellduality.data.schema import TASKS, DataError
from cellduality.data.splits import Split, split_cells
from cellduality.sentences import Sentences
from cellduality.tasks.classification import annotation_rows, drug_sensitivity_rows, response_labels
from cellduality.tasks.common import TaskConfig
from cellduality.tasks.generative import (
    PerturbationPlan,
    generation_prompts,
    generation_rows,
    perturbation_plan,
)

#: row builders of the tasks built cell by cell (perturbation: :class:`PerturbationPlan`; neighbourhood
#: is built from the whole matrix, see ``cellduality.tasks.build``)
CELL_BUILDERS = {
    "annotation": annotation_rows,
    "generation": generation_rows,
    "drug_sensitivity": drug_sensitivity_rows,
}


def _rl_annotation(obs, sentences, cells, columns, dataset, cfg, pool, gene_scores):
    return annotation_rows(
        obs,
        sentences,
        cells,
        columns,
        dataset,
        RL_SPLIT,
        cfg,
        pool=pool,
        gene_scores=gene_scores,
        closed=True,
    )


def _rl_drug(obs, sentences, cells, columns, dataset, cfg, pool, gene_scores):
    return drug_sensitivity_rows(
        obs, sentences, cells, columns, dataset, RL_SPLIT, cfg, gene_scores=gene_scores
    )


def _rl_generation(obs, sentences, cells, columns, dataset, cfg, pool, gene_scores):
    return generation_prompts(obs, cells, dataset, cfg, pool)


#: row builders of the RL pool: prompts that carry no label of their own (see ``divide_training``)
RL_BUILDERS = {"annotation": _rl_annotation, "generation": _rl_generation, "drug_sensitivity": _rl_drug}


def split_key(task: str, data: CellData) -> tuple[str | None, str | None]:
    """Column an OOD split holds values of for ``task``, and the control value it never holds out."""
    c = data.columns
    if task in ("annotation", "generation"):
        return c.cell_type, None
    if task == "drug_sensitivity":
        return c.drug, None
    return c.perturbation, str(c.control_value)


def candidate_pool(
    task: str, obs: Any, columns: Any, train_cells: np.ndarray
) -> list[str] | np.ndarray | None:
    """What a task's candidate lists are drawn from: the *training* split only.

    ``obs`` is the task's own cell table (cells without a label already dropped) and ``train_cells``
    positions into it.

    Cell-type tasks: the training cells' types. Perturbation: the training cells themselves (their
    perturbations, per context). Drug sensitivity: both responses, always (``None``).
    """
    if task in ("annotation", "generation"):
        return sorted(obs[columns.cell_type].astype(str).iloc[train_cells].unique())
    if task == "perturbation":
        return train_cells
    return None


#: the split of the RL pool (GRPO's prompts) when the training split is divided (``--sft-examples``)
RL_SPLIT = "rl"
#: the order the splits of a preparation are built and written in
SPLIT_ORDER = ("train", RL_SPLIT, "test")
_SPLIT_STREAM = {"train": 0, "test": 1, RL_SPLIT: 2}


def subsample(cells: np.ndarray, limit: int | None, seed: int, task: str, split: str) -> np.ndarray:
    """``--max-examples``: a seeded sample of ``cells`` (sorted), or all of them."""
    if limit is None or cells.size <= limit:
        return cells
    rng = np.random.default_rng([seed, TASKS.index(task), _SPLIT_STREAM[split]])
    return np.sort(rng.choice(cells, size=limit, replace=False))


def divide(
    cells: np.ndarray, n_first: int, seed: int, task: str, stream: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random ``n_first`` of ``cells`` and the rest (both sorted), reading no label: the SFT set
    and the RL pool of the paper's design. ``stream`` keeps the draws of different cell kinds apart."""
    cells = np.asarray(cells)
    if cells.size <= n_first:
        return np.sort(cells), cells[:0]
    order = np.random.default_rng([seed, TASKS.index(task), stream]).permutation(cells)
    return np.sort(order[:n_first]), np.sort(order[n_first:])


def label_columns(task: str, columns: Any) -> list[str]:
    """The obs columns whose value is the label (or condition) of a ``task`` example."""
    return [c for c in columns.required_for(task) if c]


def task_cells(data: CellData, tasks: Sequence[str], notes: list[str]) -> dict[str, np.ndarray]:
    """Per task, positions of the cells whose label columns have a value (NaN / blank dropped, noted)."""
    obs = data.adata.obs
    missing_by_column: dict[str, np.ndarray] = {}
    used_by: dict[str, list[str]] = {}
    out: dict[str, np.ndarray] = {}
    for task in tasks:
        ok = np.ones(len(obs), dtype=bool)
        for column in label_columns(task, data.columns):
            if column not in missing_by_column:
                missing_by_column[column] = missing_mask(obs[column])
            used_by.setdefault(column, []).append(task)
            ok &= ~missing_by_column[column]
        if not ok.any():
            names = ", ".join(repr(c) for c in label_columns(task, data.columns))
            raise DataError(
                f"task {task!r}: no cell has a value in {names} (every value is NaN or blank); name a "
                "column that holds the labels"
            )
        out[task] = np.flatnonzero(ok)
    for column, missing in missing_by_column.items():
        if missing.any():
            notes.append(
                f"dropped {int(missing.sum())} of {len(missing)} cells whose {column!r} is NaN or blank from "
                f"{', '.join(used_by[column])} (a missing label is not a class)"
            )
    return out


@dataclass
class TaskPlan:
    """One task's share of a preparation: its cells, split, candidate pool and the cells of each split
    that get an example (``cells``, positions into ``obs``, in row order)."""

    task: str
    positions: np.ndarray
    obs: pd.DataFrame
    split: Split
    pool: Any = None
    cells: dict[str, np.ndarray] = field(default_factory=dict)
    perturbation: dict[str, PerturbationPlan] = field(default_factory=dict)
    #: the RL pool's labelled cells (positions into ``obs``), read by the oracle only (``rl_reference``)
    reference: np.ndarray | None = None

    def rows(
        self,
        split_name: str,
        cells: np.ndarray,
        sentences: Sentences,
        data: CellData,
        cfg: TaskConfig,
        gene_scores: Mapping[str, float] | None,
    ) -> pa.Table:
        """The examples of ``cells`` (a chunk of ``self.cells[split_name]``) as a record table;
        ``sentences`` are the whole dataset's (indexed like ``data.adata.obs``)."""
        task_sentences = sentences.view(self.positions)
        if self.task == "perturbation":
            plan = self.perturbation[split_name]
            if split_name == RL_SPLIT:
                return plan.rl_rows(self.obs, task_sentences, cells, data.columns, data.name, cfg)
            return plan.rows(self.obs, task_sentences, cells, data.columns, data.name, cfg)
        if split_name == RL_SPLIT:  # prompts whose candidates are the SFT set's labels, never the cell's own
            builder = RL_BUILDERS[self.task]
            return builder(
                self.obs, task_sentences, cells, data.columns, data.name, cfg, self.pool, gene_scores
            )
        builder = CELL_BUILDERS[self.task]
        return builder(
            self.obs,
            task_sentences,
            cells,
            data.columns,
            data.name,
            split_name,
            cfg,
            pool=self.pool,
            gene_scores=gene_scores,
        )


@dataclass
class Plan:
    """Every task's plan, the notes planning wrote and ``meta['split']``."""

    tasks: list[str]
    plans: list[TaskPlan]
    notes: list[str]
    split_info: dict[str, dict[str, Any]]

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this preparation writes: ``train``/``test``, and ``rl`` with an RL pool."""
        present = {name for p in self.plans for name in p.cells}
        return tuple(s for s in SPLIT_ORDER if s in present or s != RL_SPLIT)


def resolve_tasks(
    data: CellData | None, tasks: Sequence[str] | None, *, columns: Any = None, obs_columns: Any = None
) -> list[str]:
    """The tasks to build (default: every one the dataset supports), checked against the obs columns.

    ``columns`` / ``obs_columns`` stand in for ``data``'s (a file not read yet: its column names).
    """
    columns = columns if columns is not None else data.columns
    obs_columns = list(obs_columns if obs_columns is not None else data.adata.obs.columns)
    supported = columns.supported_tasks()
    if tasks is None:
        tasks = supported
        if not tasks:
            raise DataError(
                "no task can be built: name at least one of the cell-type, drug+response or "
                f"perturbation columns (obs columns: {', '.join(map(str, obs_columns))})"
            )
    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        columns.require(task, obs_columns)
    return tasks


def _limit(cfg: TaskConfig, split: str) -> int | None:
    return cfg.rl_examples if split == RL_SPLIT else cfg.max_examples


def divide_training(
    task: str, obs: pd.DataFrame, columns: Any, train: np.ndarray, cfg: TaskConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The SFT set, the RL pool's prompt cells and the RL pool's labelled cells (the oracle's reference)
    of one task's training split, drawn without reading a label.

    Classification and generation: ``sft_examples`` random training cells are the SFT set, the others
    the RL pool (their cells are the prompts; for generation the reference of the pool's oracle too).
    Perturbation: ``sft_examples`` random perturbed cells (the SFT set's answers) with as many control
    cells (what the SFT examples are conditioned on, at most half of the controls); the RL pool's
    prompts are the other control cells (a control and a perturbation name is a prompt: no perturbed
    cell needed) and its reference the other perturbed cells.
    """
    n = int(cfg.sft_examples or 0)
    if task != "perturbation":
        # annotation and generation share their cells: one division, so that no RL-pool cell of one is
        # an SFT answer of the other
        sft, rl = divide(train, n, cfg.seed, "annotation" if task == "generation" else task)
        return sft, rl, rl
    conditions = obs[columns.perturbation].astype(str).to_numpy()
    train = np.asarray(train)
    is_control = conditions[train] == str(columns.control_value)
    sft_perturbed, rl_perturbed = divide(train[~is_control], n, cfg.seed, task)
    controls = train[is_control]
    sft_controls, rl_controls = divide(controls, min(n, controls.size // 2), cfg.seed, task, stream=4)
    return np.sort(np.concatenate([sft_perturbed, sft_controls])), rl_controls, rl_perturbed


def plan_tasks(
    data: CellData,
    tasks: Sequence[str],
    *,
    split: str = "id",
    config: TaskConfig | None = None,
    test_fraction: float = 0.2,
    holdout: Sequence[str] | None = None,
) -> Plan:
    """Plan every task of ``tasks`` (see :func:`resolve_tasks`); raises what ``build_tasks`` raises about
    labels and splits, in the same order."""
    cfg = config or TaskConfig()
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if cfg.hidden_rule not in ("informative", "random"):
        raise DataError(f"hidden_rule must be 'informative' or 'random', got {cfg.hidden_rule!r}")
    notes: list[str] = []
    cells_of = task_cells(data, tasks, notes)
    obs_all = data.adata.obs
    plans: list[TaskPlan] = []
    split_info: dict[str, dict[str, Any]] = {}
    for task in tasks:
        positions = cells_of[task]
        obs = obs_all.iloc[positions]
        key, control = split_key(task, data)
        task_holdout = holdout
        if holdout is not None and task in ("perturbation", "neighbourhood"):
            c = data.columns
            task_holdout = [
                canonical_condition(h, str(c.control_value), c.combo_sep, c.perturbation_kind)
                for h in holdout
            ]
        s: Split = split_cells(
            obs,
            mode=split,
            key=key,
            test_fraction=test_fraction,
            seed=cfg.seed,
            holdout=task_holdout,
            control_value=control,
        )
        split_info[task] = {"mode": s.mode, "key": s.key, "holdout": list(s.holdout)}
        if task == "neighbourhood":  # reads the whole table: the split's positions made absolute
            absolute = replace(s, train=positions[s.train], test=positions[s.test])
            plans.append(TaskPlan(task, positions, obs, absolute))
            continue
        sft_cells, rl_cells = s.train, None
        if cfg.sft_examples is not None:
            sft_cells, rl_cells, reference = divide_training(task, obs, data.columns, s.train, cfg)
            split_info[task].update(sft_examples=cfg.sft_examples)
        plan = TaskPlan(task, positions, obs, s, pool=candidate_pool(task, obs, data.columns, sft_cells))
        splits = [("train", sft_cells), ("test", s.test)]
        if rl_cells is not None:
            splits.insert(1, (RL_SPLIT, rl_cells))
            plan.reference = reference
        for name, cells in splits:
            if task == "perturbation":
                pp = perturbation_plan(obs, cells, data.columns, name, pool=plan.pool)
                plan.perturbation[name] = pp
                # the RL pool's prompts are its control cells (a control and a perturbation name)
                perturbed = cells if name == RL_SPLIT else pp.perturbed(cells)
                chosen = perturbed[
                    subsample(np.arange(perturbed.size), _limit(cfg, name), cfg.seed, task, name)
                ]
            else:
                if task == "drug_sensitivity":
                    response_labels(obs, data.columns)  # unknown response values: refused here
                chosen = subsample(cells, _limit(cfg, name), cfg.seed, task, name)
            if chosen.size == 0:
                what = "RL pool" if name == RL_SPLIT else name
                raise DataError(
                    f"task {task!r} has no {what} example ({len(positions)} usable cells): too few cells "
                    "or conditions for a train/test split"
                    + (f" and an SFT set of {cfg.sft_examples}" if cfg.sft_examples else "")
                    + "; use more cells, another --test-fraction"
                    + (", a smaller --sft-examples" if cfg.sft_examples else "")
                    + " or --split id"
                )
            plan.cells[name] = chosen
            if name == RL_SPLIT:
                split_info[task]["rl_pool"] = int(chosen.size)
        plans.append(plan)
    return Plan(list(tasks), plans, notes, split_info)


#: the side table of the RL pool's labelled cells, read by the aligned oracle only (``oracle_eval``)
REFERENCE_TABLE = "rl_reference"


def reference_rows(plan: Plan, data: CellData) -> dict[str, list[str]]:
    """The RL pool's labels the oracle compares with, as columns: per generation and perturbation
    reference cell its ``dataset``, ``task``, ``condition`` (cell type, perturbation), ``context`` (as the
    RL rows write it) and ``cell_id``. A self-supervised run never reads this table."""
    from cellduality.tasks.classification import context_texts

    out: dict[str, list[str]] = {k: [] for k in ("dataset", "task", "condition", "context", "cell_id")}
    c = data.columns
    for p in plan.plans:
        if p.reference is None or p.task not in ("generation", "perturbation"):
            continue
        cells = np.asarray(p.reference)
        if p.task == "generation":
            conditions = p.obs[c.cell_type].astype(str).iloc[cells].tolist()
            contexts = [""] * len(cells)
        else:
            conditions = p.obs[c.perturbation].astype(str).iloc[cells].tolist()
            contexts = context_texts(p.obs, cells, c.context)
        out["dataset"] += [data.name] * len(cells)
        out["task"] += [p.task] * len(cells)
        out["condition"] += conditions
        out["context"] += contexts
        out["cell_id"] += p.obs.index[cells].astype(str).tolist()
    return out
