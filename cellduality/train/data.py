"""Datasets for the training entry points, from a prepared folder or built (once) from raw data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, concatenate_datasets

from cellduality.tasks.build import META_FILE, PreparedTasks, load_prepared, merge_prepared, prepare_cached
from cellduality.tasks.common import TaskConfig
from cellduality.train.configs import CellDualityArguments


def load_task_data(args: CellDualityArguments, training_args: Any) -> PreparedTasks:
    """The prepared tasks a run trains on: every source of ``args.dataset``, merged.

    ``training_args`` (TRL's config) provides the process layout: its ``main_process_first`` knows the
    real ranks, also on CPU where a bare ``accelerate.PartialState()`` would report a single process.
    """
    root = Path(args.prepared_dir or Path(training_args.output_dir) / "prepared")
    sources = list(args.dataset)
    parts = []
    for source in sources:
        cache = root if len(sources) == 1 else root / Path(source).name
        parts.append(_load_one(args, source, cache, training_args))
    return merge_prepared(parts)


def _load_one(args: CellDualityArguments, source: str, cache: Path, training_args: Any) -> PreparedTasks:
    """A folder written by ``cellduality prepare`` is used as it is. An embedded name is built once, by
    the main process, into ``cache`` (other ranks wait, then read it), and reused by later runs with the
    same settings. Tasks the dataset does not support are skipped.
    """
    if (Path(source) / META_FILE).exists():
        return load_prepared(source)
    config = TaskConfig(
        top_k=args.sentence_genes,
        n_genes=args.n_genes,
        seed=training_args.seed,
        sft_examples=args.sft_examples,
        rl_examples=args.rl_examples,
    )
    with training_args.main_process_first(local=False, desc=f"preparing {source}"):
        return prepare_cached(
            source,
            cache,
            args.tasks,
            split=args.data_split,
            config=config,
            build=training_args.process_index == 0,
        )


def training_rows(
    prepared: PreparedTasks,
    tasks: list[str] | None,
    weights: list[float] | None,
    max_per_task: int | None,
    seed: int,
    split: str = "train",
) -> Dataset:
    """Rows of ``tasks`` from ``split``, capped per task and resampled to the requested task mix.

    With weights, each task gets ``round(w / max(w) * n_max)`` rows (sampled with replacement when it
    has fewer), where ``n_max`` is the row count of the most weighted task after the cap.
    """
    ds = prepared.datasets[split]
    present = list(dict.fromkeys(ds["task"]))
    tasks = tasks or present
    missing = [t for t in tasks if t not in present]
    if missing:
        raise ValueError(f"tasks {missing} are not in the dataset; it has {present}")
    if weights is not None and len(weights) != len(tasks):
        raise ValueError(f"task_weights has {len(weights)} values for {len(tasks)} tasks {tasks}")
    rng = np.random.default_rng(seed)
    task_col = np.asarray(ds["task"])
    per_task = {}
    for t in tasks:
        idx = np.flatnonzero(task_col == t)
        if max_per_task is not None and idx.size > max_per_task:
            idx = np.sort(rng.choice(idx, size=max_per_task, replace=False))
        per_task[t] = idx
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if (w <= 0).any():
            raise ValueError("task_weights must be positive")
        lead = tasks[int(np.argmax(w))]
        n_max = per_task[lead].size
        for t, wt in zip(tasks, w, strict=True):
            want = max(1, round(wt / w.max() * n_max))
            idx = per_task[t]
            per_task[t] = np.sort(rng.choice(idx, size=want, replace=want > idx.size))
    parts = [ds.select(per_task[t]) for t in tasks]
    return concatenate_datasets(parts).shuffle(seed=seed)
