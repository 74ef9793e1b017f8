"""Turn a validated dataset into the task examples of the 2x2 suite, save and reload them.

A prepared folder holds a ``datasets.DatasetDict`` (train/test; every task in one table, see the
record contract) and ``meta.json``: the gene vocabulary, the rank -> expression fit, what was done to
the data, the split and the configuration; and, for tasks that need more than rows, named side tables
under ``tables/`` (the neighbourhood task's mean training deltas). Training and evaluation read only
this folder, so what they see is exactly what ``cellduality prepare`` reported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets
from datasets import Sequence as HFSequence

from cellduality.data.loading import CellData
from cellduality.data.perturbations import canonical_condition, missing_mask
from cellduality.data.schema import TASKS, DataError
from cellduality.data.splits import Split, split_cells
from cellduality.sentences import cell_sentences, fit_rank_expression
from cellduality.tasks.classification import annotation_rows, drug_sensitivity_rows
from cellduality.tasks.common import TaskConfig, presence_scores, record
from cellduality.tasks.generative import generation_rows, perturbation_rows
from cellduality.tasks.neighbourhood import DELTA_TABLE, delta_table, neighbourhood_examples

META_FILE = "meta.json"
TABLES_DIR = "tables"

BUILDERS = {
    "annotation": annotation_rows,
    "generation": generation_rows,
    "drug_sensitivity": drug_sensitivity_rows,
    "perturbation": perturbation_rows,
    # built from the data and the split at once (both splits and its delta table): see build_tasks
    "neighbourhood": neighbourhood_examples,
}

FEATURES = Features(
    {
        "id": Value("string"),
        "task": Value("string"),
        "prompt": [{"role": Value("string"), "content": Value("string")}],
        "answer": Value("string"),
        "candidates": HFSequence(Value("string")),
        "condition": Value("string"),
        "condition_text": Value("string"),
        "cell_genes": HFSequence(Value("string")),
        "visible_genes": HFSequence(Value("string")),
        "hidden_genes": HFSequence(Value("string")),
        "n_genes": Value("int32"),
        "context": Value("string"),
        "cell_id": Value("string"),
        "dataset": Value("string"),
        "neighbours": HFSequence(Value("string")),
    }
)


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


def _subsample(cells: np.ndarray, limit: int | None, seed: int, task: str, split: str) -> np.ndarray:
    if limit is None or cells.size <= limit:
        return cells
    rng = np.random.default_rng([seed, TASKS.index(task), 0 if split == "train" else 1])
    return np.sort(rng.choice(cells, size=limit, replace=False))


def _rows_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """Rows as a ``Dataset`` with the record features, also when there is none."""
    if not rows:
        return Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    return Dataset.from_list(rows, features=FEATURES)


def label_columns(task: str, columns: Any) -> list[str]:
    """The obs columns whose value is the label (or condition) of a ``task`` example."""
    return [c for c in columns.required_for(task) if c]


def _task_cells(data: CellData, tasks: Sequence[str], notes: list[str]) -> dict[str, np.ndarray]:
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


def build_tasks(
    data: CellData,
    tasks: Sequence[str] | None = None,
    *,
    split: str = "id",
    config: TaskConfig | None = None,
    test_fraction: float = 0.2,
    holdout: Sequence[str] | None = None,
) -> PreparedTasks:
    """Examples of every requested task (default: all the dataset supports), split into train/test."""
    cfg = config or TaskConfig()
    supported = data.columns.supported_tasks()
    if tasks is None:
        tasks = supported
        if not tasks:
            raise DataError(
                "no task can be built: name at least one of the cell-type, drug+response or "
                f"perturbation columns (obs columns: {', '.join(map(str, data.adata.obs.columns))})"
            )
    tasks = list(dict.fromkeys(tasks))
    for task in tasks:
        data.columns.require(task, data.adata.obs.columns)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    notes: list[str] = []
    cells_of = _task_cells(data, tasks, notes)
    obs_all = data.adata.obs
    sentences = cell_sentences(
        data.adata,
        top_k=max(cfg.top_k, cfg.answer_genes),
        seed=cfg.seed,
        allow_scaled=data.value_type != "log-normalised",
    )
    fit = fit_rank_expression(data.adata, seed=cfg.seed)
    if cfg.hidden_rule not in ("informative", "random"):
        raise DataError(f"hidden_rule must be 'informative' or 'random', got {cfg.hidden_rule!r}")
    # label-free: only the sentences are read (see presence_scores)
    gene_scores = (
        presence_scores([s[: cfg.top_k] for s in sentences]) if cfg.hidden_rule == "informative" else None
    )
    parts: dict[str, list[Dataset]] = {"train": [], "test": []}
    tables: dict[str, Dataset] = {}
    split_info: dict[str, dict[str, Any]] = {}
    for task in tasks:
        positions = cells_of[task]
        obs = obs_all.iloc[positions]
        task_sentences = [sentences[i] for i in positions]
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
            built = neighbourhood_examples(data, absolute, cfg)
            for name in ("train", "test"):
                rows = built.rows[name]
                keep = _subsample(np.arange(len(rows)), cfg.max_examples, cfg.seed, task, name)
                parts[name].append(_rows_dataset([rows[k] for k in keep]))
            tables[DELTA_TABLE] = delta_table(built.table)
            split_info[task]["graph"] = built.graph
            notes += built.notes
            continue
        pool = candidate_pool(task, obs, data.columns, s.train)
        for name, cells in (("train", s.train), ("test", s.test)):
            extra = {"pool": pool, "gene_scores": gene_scores}
            if task == "perturbation":
                rows = perturbation_rows(
                    obs, task_sentences, cells, data.columns, data.name, name, cfg, **extra
                )
                keep = _subsample(np.arange(len(rows)), cfg.max_examples, cfg.seed, task, name)
                rows = [rows[k] for k in keep]
            else:
                cells = _subsample(cells, cfg.max_examples, cfg.seed, task, name)
                rows = BUILDERS[task](obs, task_sentences, cells, data.columns, data.name, name, cfg, **extra)
            if not rows:
                raise DataError(
                    f"task {task!r} has no {name} example ({len(positions)} usable cells): too few cells "
                    "or conditions for a train/test split; use more cells, another --test-fraction or "
                    "--split id"
                )
            parts[name].append(_rows_dataset(rows))
    dd = DatasetDict(
        {name: concatenate_datasets(ds) if ds else _rows_dataset([]) for name, ds in parts.items()}
    )
    meta = {
        "dataset": data.name,
        "tasks": tasks,
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
        "summary": summarise(dd),
    }
    from cellduality.tasks.labels import task_labels  # what a prediction may ask this dataset's model

    train_rows = dd["train"].select_columns(["task", "candidates", "condition"]).to_list()
    meta["labels"] = task_labels(train_rows, data, tasks, split_info)
    meta["hidden_genes"]["scores"] = {g: round(v, 6) for g, v in (gene_scores or {}).items()}
    return PreparedTasks(dd, meta, tables)


def summarise(dd: DatasetDict) -> list[dict[str, Any]]:
    """Rows per task and split, with the mean length of input and answer sentences."""
    out = []
    for split_name, ds in dd.items():
        if len(ds) == 0:
            continue
        tasks = np.asarray(ds["task"])
        cell_len = np.asarray([len(g) for g in ds["cell_genes"]])
        ans_len = np.asarray([len(a.split()) for a in ds["answer"]])
        for task in sorted(set(tasks), key=TASKS.index):
            m = tasks == task
            out.append(
                {
                    "task": str(task),
                    "split": split_name,
                    "rows": int(m.sum()),
                    "input_genes": float(cell_len[m].mean()),
                    "answer_genes": float(ans_len[m].mean()),
                }
            )
    return out


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
