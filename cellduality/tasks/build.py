"""Turn a validated dataset into the task examples of the 2x2 suite, save and reload them.

A prepared folder holds a ``datasets.DatasetDict`` (train/test; every task in one table, see the
record contract) and ``meta.json``: the gene vocabulary, the rank -> expression fit, what was done to
the data, the split and the configuration; and, for tasks that need more than rows, named side tables
under ``tables/`` (the neighbourhood task's mean training deltas). Training and evaluation read only
this folder, so what they see is exactly what ``cellduality prepare`` reported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from cellduality.data.loading import CellData
from cellduality.data.schema import DataError
from cellduality.sentences import GenePresence, RankExpressionFit, cell_sentences, fit_rank_expression
from cellduality.tasks.columns import FEATURES
from cellduality.tasks.common import TaskConfig, record
from cellduality.tasks.neighbourhood import DELTA_TABLE, delta_table, neighbourhood_examples
from cellduality.tasks.output import LabelCollector, SummaryCounter, rows_dataset, table_dataset
from cellduality.tasks.plan import (  # noqa: F401  (split_key, candidate_pool: public names of this module)
    REFERENCE_TABLE,
    RL_SPLIT,
    candidate_pool,
    label_columns,
    plan_tasks,
    reference_rows,
    resolve_tasks,
    split_key,
    subsample,
)

META_FILE = "meta.json"
TABLES_DIR = "tables"


@dataclass
class PreparedTasks:
    """Task examples of one dataset with everything needed to interpret them later.

    ``tables``: named side tables a task needs besides its rows (``neighbourhood_deltas``), each with a
    ``dataset`` column so that merged parts stay apart.
    """

    datasets: DatasetDict
    meta: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Dataset] = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        return list(self.meta.get("genes", []))


def build_tasks(
    data: CellData,
    tasks: Sequence[str] | None = None,
    *,
    split: str = "id",
    config: TaskConfig | None = None,
    test_fraction: float = 0.2,
    holdout: Sequence[str] | None = None,
) -> PreparedTasks:
    """Examples of every requested task (default: all the dataset supports), split into train/test.

    The in-memory path: the whole matrix is in ``data``. ``cellduality.tasks.blockwise`` builds the same
    rows from an ``.h5ad`` file read block by block; both plan with :func:`plan_tasks`.
    """
    cfg = config or TaskConfig()
    tasks = resolve_tasks(data, tasks)
    plan = plan_tasks(data, tasks, split=split, config=cfg, test_fraction=test_fraction, holdout=holdout)
    notes = list(plan.notes)
    sentences = cell_sentences(
        data.adata,
        top_k=max(cfg.top_k, cfg.answer_genes),
        seed=cfg.seed,
        allow_scaled=data.value_type != "log-normalised",
    )
    fit = fit_rank_expression(data.adata, seed=cfg.seed)
    # label-free: only the sentences are read (see presence_scores)
    gene_scores = None
    if cfg.hidden_rule == "informative":
        presence = GenePresence(len(sentences.names), cfg.top_k)
        presence.add(0, sentences.genes, sentences.counts)
        gene_scores = presence.scores(sentences.names)
    parts: dict[str, list[Dataset]] = {name: [] for name in plan.splits}
    tables: dict[str, Dataset] = {}
    reference = reference_rows(plan, data) if RL_SPLIT in plan.splits else None
    if reference and reference["cell_id"]:  # an empty table does not survive save/load: none is written
        tables[REFERENCE_TABLE] = Dataset.from_dict(reference)
    for task_plan in plan.plans:
        if task_plan.task == "neighbourhood":
            built = neighbourhood_examples(data, task_plan.split, cfg)
            for name in ("train", "test"):
                rows = built.rows[name]
                keep = subsample(np.arange(len(rows)), cfg.max_examples, cfg.seed, task_plan.task, name)
                parts[name].append(rows_dataset([rows[k] for k in keep], FEATURES))
            tables[DELTA_TABLE] = delta_table(built.table)
            plan.split_info[task_plan.task]["graph"] = built.graph
            notes += built.notes
            continue
        for name in task_plan.cells:
            table = task_plan.rows(name, task_plan.cells[name], sentences, data, cfg, gene_scores)
            parts[name].append(table_dataset(table, FEATURES))
    dd = DatasetDict(
        {name: concatenate_datasets(ds) if ds else rows_dataset([], FEATURES) for name, ds in parts.items()}
    )
    labels = LabelCollector()
    labels.add_table(dd["train"].data.table)
    meta = prepared_meta(data, tasks, cfg, notes, fit, plan.split_info, gene_scores, test_fraction)
    meta["summary"] = summarise(dd)
    finish_meta(meta, data, tasks, plan.split_info, labels, gene_scores)
    return PreparedTasks(dd, meta, tables)


def prepared_meta(
    data: CellData,
    tasks: Sequence[str],
    cfg: TaskConfig,
    notes: Sequence[str],
    fit: RankExpressionFit,
    split_info: dict[str, Any],
    gene_scores: Mapping[str, float] | None,
    test_fraction: float,
) -> dict[str, Any]:
    """``meta.json`` of a preparation, up to its summary (key order kept: it is the file's order)."""
    return {
        "dataset": data.name,
        "tasks": list(tasks),
        "value_type": data.value_type,
        "notes": [*data.notes, *notes],
        "n_cells": int(data.adata.n_obs),
        "n_empty_dropped": data.n_empty_dropped,
        "genes": data.genes,
        "fit": asdict(fit),
        "columns": asdict(data.columns),
        "config": asdict(cfg),
        "sentences": cfg.sentence_settings(),
        "split": split_info,
        "hidden_genes": {
            "rule": cfg.hidden_rule,
            "fraction": cfg.hidden_fraction,
            "most_informative": sorted(gene_scores, key=lambda g: -gene_scores[g])[:20]
            if gene_scores
            else [],
        },
        "test_fraction": test_fraction,
        "source": data.source,
    }


def finish_meta(
    meta: dict[str, Any],
    data: CellData,
    tasks: Sequence[str],
    split_info: dict[str, Any],
    labels: LabelCollector,
    gene_scores: Mapping[str, float] | None,
) -> None:
    """The keys after the summary: the labels a prediction may ask about, the hidden-gene scores."""
    from cellduality.tasks.labels import task_labels  # what a prediction may ask this dataset's model

    meta["labels"] = task_labels(labels.rows(), data, tasks, split_info)
    meta["hidden_genes"]["scores"] = {g: round(v, 6) for g, v in (gene_scores or {}).items()}


def summarise(dd: DatasetDict) -> list[dict[str, Any]]:
    """Rows per task and split, with the mean length of input and answer sentences."""
    counter = SummaryCounter()
    for split_name, ds in dd.items():
        if len(ds):
            counter.add_table(split_name, ds.data.table)
    return counter.summary()


@contextmanager
def _quiet_datasets():
    """Silence ``datasets``' per-shard progress bars: our own summary says what was written."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def save_prepared(prepared: PreparedTasks, out_dir: str | Path) -> Path:
    """Write the DatasetDict and ``meta.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_datasets():
        prepared.datasets.save_to_disk(str(out / "data"))
        tables_dir = out / TABLES_DIR
        for name, table in prepared.tables.items():
            table.save_to_disk(str(tables_dir / name))
    # the tables this preparation wrote, by name: a table an earlier preparation left in the folder is
    # never read back (and nothing in the folder is deleted)
    meta = {**prepared.meta, TABLES_DIR: sorted(prepared.tables)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def load_prepared(path: str | Path) -> PreparedTasks:
    """Read a folder written by ``save_prepared`` (or ``cellduality prepare``)."""
    p = Path(path)
    if not (p / META_FILE).exists():
        raise DataError(
            f"{p} is not a prepared dataset folder (no {META_FILE}); run `cellduality prepare` first"
        )
    from datasets import load_from_disk

    datasets = load_from_disk(str(p / "data"))
    for split, ds in datasets.items():  # folders prepared before a column existed get it, empty
        missing = [c for c in FEATURES if c not in ds.column_names]
        if missing:
            empty = record()
            for column in missing:
                ds = ds.add_column(column, [empty[column]] * len(ds))
            datasets[split] = ds.cast(FEATURES)
    meta = json.loads((p / META_FILE).read_text())
    tables_dir = p / TABLES_DIR
    names = meta.pop(TABLES_DIR, None)
    if names is None:  # a folder from before the list was recorded: every table in it
        names = sorted(t.name for t in tables_dir.iterdir() if t.is_dir()) if tables_dir.is_dir() else []
    tables = {name: load_from_disk(str(tables_dir / name)) for name in names}
    from cellduality.data.labels import check_prepared_labels
    from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS

    # a folder prepared before the label checks existed
    check_prepared_labels(datasets, str(p), CLASSIFICATION_TASKS, GENERATION_TASKS)
    return PreparedTasks(datasets, meta, tables)


def merge_prepared(parts: Sequence[PreparedTasks]) -> PreparedTasks:
    """Several prepared datasets as one: rows concatenated, per-dataset metadata kept under ``parts``.

    Each row's ``dataset`` column names the part it came from, so evaluation can find that part's gene
    list and rank -> expression fit. ``genes`` is the union (first-seen order), the vocabulary the
    rewards clean generated genes with.
    """
    if not parts:
        raise DataError("no dataset to merge")
    if len(parts) == 1:
        return parts[0]
    names = [p.meta["dataset"] for p in parts]
    if len(set(names)) != len(names):
        raise DataError(f"the same dataset is named twice: {names}")
    splits = {name for p in parts for name in p.datasets}
    merged = DatasetDict(
        {
            split: concatenate_datasets([p.datasets[split] for p in parts if split in p.datasets])
            for split in sorted(splits)
        }
    )
    genes = list(dict.fromkeys(g for p in parts for g in p.genes))
    meta = {
        "dataset": "+".join(names),
        "tasks": list(dict.fromkeys(t for p in parts for t in p.meta["tasks"])),
        "genes": genes,
        "parts": {p.meta["dataset"]: p.meta for p in parts},
        "summary": summarise(merged),
    }
    table_names = dict.fromkeys(name for p in parts for name in p.tables)
    tables = {
        name: concatenate_datasets([p.tables[name] for p in parts if name in p.tables])
        for name in table_names
    }
    return PreparedTasks(merged, meta, tables)


def part_meta(meta: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The metadata of one dataset inside a (possibly merged) prepared meta."""
    if "parts" in meta:
        return meta["parts"][dataset]
    if meta.get("dataset") != dataset:
        raise KeyError(f"dataset {dataset!r} is not in this prepared folder ({meta.get('dataset')})")
    return meta


def prepare_cached(
    name: str,
    cache: str | Path,
    tasks: Sequence[str] | None = None,
    *,
    split: str = "id",
    config: TaskConfig | None = None,
    build: bool = True,
) -> PreparedTasks:
    """An embedded dataset's examples, built into ``cache`` once and reused while the settings match.

    Tasks the dataset does not support are skipped (so one task list serves several datasets). With
    ``build=False`` nothing is built: the cache is read as it is (the other ranks of a run whose main
    process built it).
    """
    from cellduality.data import load_dataset

    cfg = config or TaskConfig()
    folder = Path(cache)
    key = {"dataset": name, "tasks": list(tasks) if tasks else None, "split": split, "config": asdict(cfg)}
    key_file = folder / "build_key.json"
    fresh = (folder / META_FILE).exists() and key_file.exists() and json.loads(key_file.read_text()) == key
    if fresh or not build:
        return load_prepared(folder)
    data = load_dataset(name)
    supported = data.columns.supported_tasks(include_opt_in=True)
    wanted = [t for t in tasks if t in supported] if tasks else None
    prepared = build_tasks(data, wanted or None, split=split, config=cfg)
    save_prepared(prepared, folder)
    key_file.write_text(json.dumps(key))
    return prepared
