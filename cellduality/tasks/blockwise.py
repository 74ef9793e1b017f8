"""``cellduality prepare`` on an ``.h5ad`` file read in blocks of cells: memory bounded by the block.

The steps, and what each holds in memory:

1. :func:`cellduality.data.streaming.open_streamed` checks the file and takes every whole-matrix
   decision from a first pass (values, duplicate symbols, empty cells); it holds one block at a time.
2. :func:`cellduality.tasks.plan.plan_tasks` plans every task from the obs table (labels, splits,
   candidate pools, the ``--max-examples`` sample, perturbation pairing): every label error is raised
   here, before the matrix is read again.
3. The sentence pass reads the matrix once more, block by block, and keeps per cell only its top-K gene
   indices (:class:`SentenceStore`, a memory-mapped file of ``cells x K`` int16/int32: 200 MB for 10^6
   cells at K = 100), the counts of each gene in the sentences (the hidden-gene scores), and the
   rows of the seeded rank -> expression sample (5,000 cells).
4. The examples are built chunk by chunk from the plan and the store, column-wise (every example's
   seeded draws in one compiled pass, :mod:`cellduality.tasks.draws`; the text as Arrow columns,
   :mod:`cellduality.tasks.columns`), and appended to Arrow shards
   (:class:`cellduality.tasks.output.ShardWriter`), optionally by ``workers`` forked processes.

Row for row, the output is that of ``build_tasks`` on the same file read whole (``tests/test_blockwise.py``
checks every embedded dataset); ``meta.json`` says how it was read under ``streaming``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cellduality.data.schema import Columns
from cellduality.data.streaming import StreamedSource, open_streamed
from cellduality.sentences import (
    GenePresence,
    Sentences,
    _block_sparse,
    _csr_rows,
    _TieOrder,
    fit_rank_expression_rows,
    fit_sample,
)
from cellduality.tasks.build import (
    META_FILE,
    TABLES_DIR,
    PreparedTasks,
    _quiet_datasets,
    finish_meta,
    prepared_meta,
)
from cellduality.tasks.columns import FEATURES
from cellduality.tasks.common import TaskConfig
from cellduality.tasks.output import LabelCollector, ShardWriter, SummaryCounter, word_counts
from cellduality.tasks.plan import (
    REFERENCE_TABLE,
    RL_SPLIT,
    Plan,
    TaskPlan,
    plan_tasks,
    reference_rows,
    resolve_tasks,
)

#: examples built and written at a time (per worker job)
CHUNK_ROWS = 5_000


class SentenceStore(Sentences):
    """The top-K gene indices of every kept cell, in a memory-mapped file (:class:`Sentences` whose
    ``genes`` live on disk): ``store[i]`` is cell i's sentence, built when asked for."""

    def __init__(self, folder: Path, n_cells: int, width: int, names: Sequence[str]) -> None:
        dtype = np.int16 if len(names) < np.iinfo(np.int16).max else np.int32
        self._map = np.lib.format.open_memmap(
            folder / "sentences.npy", mode="w+", dtype=dtype, shape=(n_cells, max(width, 1))
        )
        # a plain view: slicing a memmap object costs microseconds
        super().__init__(np.asarray(self._map), np.zeros(n_cells, dtype=np.int32), names)

    def put(self, start: int, genes: np.ndarray, counts: np.ndarray) -> None:
        width = min(genes.shape[1], self.genes.shape[1])
        self.genes[start : start + genes.shape[0], :width] = genes[:, :width]
        self.counts[start : start + genes.shape[0]] = counts


def _bar(desc: str, total: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, file=sys.stderr)


def _sentence_pass(
    source: StreamedSource,
    store: SentenceStore,
    presence: GenePresence | None,
    sample_rows: np.ndarray,
    cfg: TaskConfig,
    workers: int,
    progress: bool,
) -> sp.csr_matrix:
    """Read the file once more: per block, normalise, keep the kept cells, their top-K genes into the
    store; returns the normalised rows of ``sample_rows`` (file rows, sorted) for the fit."""
    order = _TieOrder.from_seed(cfg.seed)
    width = max(cfg.top_k, cfg.answer_genes)
    kept_before = np.concatenate([[0], np.cumsum(source.keep_rows)])
    blocks = list(source.matrix.blocks(source.block_cells))
    sampled: list[sp.csr_matrix] = []

    def compute(block: tuple[int, int]) -> tuple[int, int, sp.csr_matrix, np.ndarray, np.ndarray]:
        start, stop = block
        x = source.normalise(source.matrix.rows(start, stop))
        keep = source.keep_rows[start:stop]
        if not keep.all():  # selecting rows copies the block: only when a cell is dropped
            x = x[keep]
        genes, counts = _block_sparse(_csr_rows(x, 0, x.shape[0]), width, order)
        return start, stop, x, genes, counts

    threads = max(1, min(workers, 4))
    with (
        _bar("cell sentences", source.matrix.n_rows, "cells", progress) as bar,
        ThreadPoolExecutor(max_workers=threads) as pool,
    ):
        # at most `threads` blocks in flight: memory stays bounded by the block size
        pending: list[Any] = []
        queue = iter(blocks)
        for block in queue:
            pending.append(pool.submit(compute, block))
            if len(pending) < threads:
                continue
            _consume(pending.pop(0).result(), source, store, presence, sample_rows, kept_before, sampled, bar)
        for future in pending:
            _consume(future.result(), source, store, presence, sample_rows, kept_before, sampled, bar)
    if not sampled:
        return sp.csr_matrix((0, len(source.symbols)), dtype=np.float32)
    return sp.vstack(sampled, format="csr")


def _consume(result, source, store, presence, sample_rows, kept_before, sampled, bar) -> None:
    start, stop, x, genes, counts = result
    offset = int(kept_before[start])
    store.put(offset, genes, counts)
    if presence is not None:
        presence.add(offset, genes, counts)
    lo, hi = np.searchsorted(sample_rows, [start, stop])
    if hi > lo:  # positions of the sampled file rows among this block's kept rows
        local = kept_before[sample_rows[lo:hi]] - offset
        sampled.append(x[local])
    bar.update(stop - start)


def _chunks(cells: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, cells.size, size):
        yield cells[lo : lo + size]


# state the forked row workers inherit (set before the pool starts, read-only in the workers)
_WORKER: dict[str, Any] = {}


def _build_chunk(job: tuple[str, int, np.ndarray, str]) -> tuple[str, int, SummaryCounter, LabelCollector]:
    """A worker's job: the rows of one chunk, written to their own shard; returns what the main
    process needs of them (shard path, row count, summary sums, training rows' labels)."""
    split, index, cells, path = job
    w = _WORKER
    task_plan: TaskPlan = w["plan"].plans[index]
    table = task_plan.rows(split, cells, w["store"], w["data"], w["cfg"], w["gene_scores"])
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=FEATURES, path=path)
    writer.write_table(table)
    writer.finalize()
    writer.close()
    summary, labels = SummaryCounter(), LabelCollector()
    summary.add_table(split, table)
    if split == "train":
        labels.add_table(table)
    return path, len(table), summary, labels  # sums and label sets only: the rows stay in the shard


def _write_rows(
    plan: Plan,
    store: SentenceStore,
    data,
    cfg: TaskConfig,
    gene_scores: Mapping[str, float] | None,
    writer: ShardWriter,
    workers: int,
    progress: bool,
) -> tuple[SummaryCounter, LabelCollector]:
    summary, labels = SummaryCounter(), LabelCollector()
    jobs = [
        (split, index, chunk)
        for split in plan.splits
        for index, task_plan in enumerate(plan.plans)
        for chunk in _chunks(task_plan.cells.get(split, np.arange(0)), CHUNK_ROWS)
    ]
    total = sum(len(chunk) for *_, chunk in jobs)
    for split in plan.splits:
        summary.add_split(split)
    with _bar("examples", total, "rows", progress) as bar:
        if workers <= 1 or len(jobs) < 2:
            for split, index, chunk in jobs:
                table = plan.plans[index].rows(split, chunk, store, data, cfg, gene_scores)
                writer.write(split, table)
                summary.add_table(split, table)
                if split == "train":
                    labels.add_table(table)
                bar.update(len(table))
            return summary, labels
        import multiprocessing as mp

        from cellduality.tasks.draws import compile_draws

        # compiled (or loaded from numba's cache) once, here: the forked workers inherit the loops
        compile_draws()
        word_counts(pa.array(["warm up"]))
        _WORKER.update(plan=plan, store=store, data=data, cfg=cfg, gene_scores=gene_scores)
        paths = [
            (split, index, chunk, str(writer.folder / split / f".job-{os.getpid()}-{k:06d}.arrow"))
            for k, (split, index, chunk) in enumerate(jobs)
        ]
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for (split, *_), (path, n, part_summary, part_labels) in zip(
                    paths, pool.imap(_build_chunk, paths), strict=True
                ):
                    writer.add_file(split, Path(path), n)
                    summary.merge(part_summary)
                    labels.merge(part_labels)
                    bar.update(n)
        finally:
            _WORKER.clear()
    return summary, labels


def prepare_blockwise(
    path: str | Path,
    columns: Columns | None,
    out: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    split: str = "id",
    config: TaskConfig | None = None,
    test_fraction: float = 0.2,
    holdout: Sequence[str] | None = None,
    name: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
    block_cells: int = 10_000,
    workers: int = 1,
    notes: Sequence[str] = (),
    progress: bool = True,
    on_checked: Callable[[], None] | None = None,
) -> PreparedTasks:
    """Prepare ``path`` into the folder ``out`` block by block (see the module docstring).

    Raises ``DataError`` for bad input before anything is printed or written; ``on_checked`` is called
    once every check has passed, before the first progress bar.
    """
    cfg = config or TaskConfig()
    started = time.perf_counter()
    source = open_streamed(
        path,
        columns,
        name=name,
        layer=layer,
        gene_symbols=gene_symbols,
        allow_scaled=allow_scaled,
        block_cells=block_cells,
        check_columns=lambda c, names: resolve_tasks(None, tasks, columns=c, obs_columns=names),
    )
    try:
        source.source = {
            "path": str(Path(path).resolve()),
            "layer": layer,
            "gene_symbols": gene_symbols,
            "allow_scaled": allow_scaled,
        }
        data = source.cell_data()
        data.notes[:0] = list(notes)
        tasks = resolve_tasks(data, tasks, obs_columns=source.file.obs_columns())
        plan = plan_tasks(data, tasks, split=split, config=cfg, test_fraction=test_fraction, holdout=holdout)
        checked = time.perf_counter()
        if on_checked is not None:
            on_checked()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".cellduality-prepare-", dir=out))
        try:
            prepared = _build(source, data, plan, cfg, tasks, test_fraction, out, scratch, workers, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the scratch folder this call created, only
    finally:
        source.file.close()
    prepared.meta["streaming"] = {
        **prepared.meta.get("streaming", {}),
        "block_cells": block_cells,
        "workers": workers,
        "passes": source.passes + 1,
        "fit_cells": int(fit_sample(data.adata.n_obs, cfg.seed).size),
        "check_s": round(checked - started, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    _write_meta(out, prepared.meta, prepared.tables)
    return prepared


def _build(source, data, plan, cfg, tasks, test_fraction, out, scratch, workers, progress) -> PreparedTasks:
    n_cells = data.adata.n_obs
    store = SentenceStore(scratch, n_cells, max(cfg.top_k, cfg.answer_genes), data.genes)
    presence = GenePresence(len(data.genes), cfg.top_k) if cfg.hidden_rule == "informative" else None
    kept = np.flatnonzero(source.keep_rows)
    sample = fit_sample(n_cells, cfg.seed)
    clock = [time.perf_counter()]
    sub = _sentence_pass(source, store, presence, kept[sample], cfg, workers, progress)
    clock.append(time.perf_counter())
    fit = fit_rank_expression_rows(sub, seed=cfg.seed)
    gene_scores = presence.scores(data.genes) if presence is not None else None
    clock.append(time.perf_counter())
    writer = ShardWriter(out / "data", FEATURES, list(plan.splits))
    with _quiet_datasets():
        summary, labels = _write_rows(plan, store, data, cfg, gene_scores, writer, workers, progress)
        writer.close()
    clock.append(time.perf_counter())
    meta = prepared_meta(data, tasks, cfg, plan.notes, fit, plan.split_info, gene_scores, test_fraction)
    meta["summary"] = summary.summary()
    finish_meta(meta, data, tasks, plan.split_info, labels, gene_scores)
    # where the time went (seconds): read + sentences, the fit and the hidden-gene scores, the examples
    meta["streaming"] = dict(
        zip(("sentences_s", "fit_s", "examples_s"), np.round(np.diff(clock), 3).tolist(), strict=True)
    )
    from datasets import Dataset, load_from_disk

    tables = {}
    reference = reference_rows(plan, data) if RL_SPLIT in plan.splits else None
    if reference and reference["cell_id"]:  # the RL pool's labelled cells, for the aligned oracle (obs only)
        tables[REFERENCE_TABLE] = Dataset.from_dict(reference)
        with _quiet_datasets():
            tables[REFERENCE_TABLE].save_to_disk(str(out / TABLES_DIR / REFERENCE_TABLE))
    return PreparedTasks(load_from_disk(str(out / "data")), meta, tables)


def _write_meta(out: Path, meta: dict[str, Any], tables: Sequence[str] = ()) -> None:
    """``meta.json`` as ``save_prepared`` writes it, with the side tables this call wrote."""
    (out / META_FILE).write_text(json.dumps({**meta, TABLES_DIR: sorted(tables)}, indent=1))
