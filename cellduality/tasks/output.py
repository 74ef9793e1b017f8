"""Example rows as Arrow: the record table, its per-task summary, and a prepared folder written in shards.

``rows_table`` converts rows column by column with pyarrow (``Dataset.from_list`` encodes every nested
value in Python, about 0.5 ms a row). :class:`ShardWriter` appends such tables to ``data/<split>/``
as ``datasets``' own Arrow stream files and then writes the ``state.json`` / ``dataset_info.json`` /
``dataset_dict.json`` that ``save_to_disk`` writes, so ``datasets.load_from_disk`` reads the folder as
any other prepared folder while nothing but one chunk of rows was ever held in memory.
:class:`SummaryCounter` and :class:`LabelCollector` keep, from each chunk, what ``meta.json`` needs
of all the rows (``summary``; the candidate labels of the training rows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features

from cellduality.data.schema import TASKS

#: the ASCII bytes ``str.split()`` splits on (tab to carriage return, the four separators, space)
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def word_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``len(text.split())`` of every string, read from the Arrow buffer: a word starts at a byte
    that is not a space after one that is (or at the start). A string with a non-ASCII byte (which may
    be a Unicode space) is split by Python instead."""
    if isinstance(texts, pa.ChunkedArray):
        return np.concatenate([word_counts(c) for c in texts.chunks] or [np.zeros(0, dtype=np.int64)])
    texts = pc.fill_null(texts, "").cast(pa.large_string())
    n = len(texts)
    counts = np.zeros(n, dtype=np.int64)
    if n == 0:
        return counts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + n + 1]
    if offsets[-1] == offsets[0]:
        return counts
    raw = np.frombuffer(texts.buffers()[2], dtype=np.uint8)
    high = np.zeros(n, dtype=np.bool_)
    _count_words(raw, offsets, _ASCII_SPACE, counts, high)
    for r in np.flatnonzero(high).tolist():
        counts[r] = len(texts[r].as_py().split())
    return counts


@numba.njit(nogil=True, cache=True)
def _count_words(
    raw: np.ndarray, offsets: np.ndarray, space: np.ndarray, counts: np.ndarray, high: np.ndarray
) -> None:
    """:func:`word_counts`' loop over the bytes: one pass, nothing allocated (the numpy version built
    four arrays of the column's size: 3 s of a 10^6-cell ``prepare``'s summaries). ``high[r]``: row r
    has a non-ASCII byte."""
    for r in range(counts.size):
        words = 0
        after_space = True
        for i in range(offsets[r], offsets[r + 1]):
            byte = raw[i]
            if byte >= 0x80:
                high[r] = True
            is_space = space[byte]
            if after_space and not is_space:
                words += 1
            after_space = is_space
        counts[r] = words


def rows_table(rows: Sequence[Mapping[str, Any]], features: Features) -> pa.Table:
    """Rows (dicts with every record column) as an Arrow table of ``features``' schema."""
    schema = features.arrow_schema
    columns = {name: [row[name] for row in rows] for name in features}
    return pa.Table.from_pydict(columns, schema=schema)


def rows_dataset(rows: Sequence[Mapping[str, Any]], features: Features) -> Dataset:
    """Rows as an in-memory ``Dataset`` with ``features``, also when there is none."""
    return table_dataset(rows_table(rows, features), features)


def table_dataset(table: pa.Table, features: Features) -> Dataset:
    """A record table as an in-memory ``Dataset`` with ``features``."""
    return Dataset(table, info=DatasetInfo(features=features))


class SummaryCounter:
    """``meta['summary']``: rows per task and split, mean genes of inputs and answers, kept as sums."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str], list[int]] = {}
        self._splits: list[str] = []

    def add_split(self, split: str) -> None:
        """Declare a split (the summary lists splits in the order they were declared)."""
        if split not in self._splits:
            self._splits.append(split)

    def add(self, split: str, rows: Iterable[Mapping[str, Any]]) -> None:
        self.add_split(split)
        for row in rows:
            sums = self._sums.setdefault((split, str(row["task"])), [0, 0, 0])
            sums[0] += 1
            sums[1] += len(row["cell_genes"])
            sums[2] += len(row["answer"].split())

    def add_table(self, split: str, table: pa.Table) -> None:
        """The same as :meth:`add` for an Arrow table of records, in Arrow (no Python object per row):
        an answer's genes are its runs of non-whitespace, as ``str.split()`` counts them."""
        import pyarrow.compute as pc

        self.add_split(split)
        if len(table) == 0:
            return
        tasks = table.column("task")
        cell_len = pc.fill_null(pc.list_value_length(table.column("cell_genes")), 0)
        words = pa.array(word_counts(table.column("answer")))
        for task in pc.unique(tasks).to_pylist():
            mask = pc.equal(tasks, task)
            sums = self._sums.setdefault((split, str(task)), [0, 0, 0])
            sums[0] += int(pc.sum(mask).as_py() or 0)
            sums[1] += int(pc.sum(pc.filter(cell_len, mask)).as_py() or 0)
            sums[2] += int(pc.sum(pc.filter(words, mask)).as_py() or 0)

    def merge(self, other: SummaryCounter) -> None:
        """Add another counter's sums (a worker's chunk)."""
        for split in other._splits:
            self.add_split(split)
        for key, (n, cell, answer) in other._sums.items():
            sums = self._sums.setdefault(key, [0, 0, 0])
            sums[0] += n
            sums[1] += cell
            sums[2] += answer

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for split in self._splits:
            tasks = sorted({t for s, t in self._sums if s == split}, key=TASKS.index)
            for task in tasks:
                n, cell, answer = self._sums[(split, task)]
                out.append(
                    {
                        "task": task,
                        "split": split,
                        "rows": n,
                        "input_genes": float(cell / n),
                        "answer_genes": float(answer / n),
                    }
                )
        return out


class LabelCollector:
    """What ``task_labels`` reads of the training rows (candidates, conditions), without the rows."""

    def __init__(self) -> None:
        self._candidates: dict[str, set[str]] = {}
        self._conditions: dict[str, set[str]] = {}

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            task = str(row["task"])
            self._candidates.setdefault(task, set()).update(str(c) for c in row.get("candidates") or [])
            self._conditions.setdefault(task, set()).add(str(row["condition"]))

    def add_table(self, table: pa.Table) -> None:
        """The same as :meth:`add` for an Arrow table of records (per task: the distinct candidates and
        conditions, in Arrow)."""
        import pyarrow.compute as pc

        if len(table) == 0:
            return
        tasks = table.column("task")
        for task in pc.unique(tasks).to_pylist():
            mask = pc.equal(tasks, task)
            candidates = pc.list_flatten(pc.filter(table.column("candidates"), mask))
            self._candidates.setdefault(str(task), set()).update(
                str(c) for c in pc.unique(candidates).to_pylist() if c is not None
            )
            conditions = pc.unique(pc.filter(table.column("condition"), mask)).to_pylist()
            self._conditions.setdefault(str(task), set()).update(str(c) for c in conditions)

    def merge(self, other: LabelCollector) -> None:
        """Add another collector's labels (a worker's chunk)."""
        for task, values in other._candidates.items():
            self._candidates.setdefault(task, set()).update(values)
        for task, values in other._conditions.items():
            self._conditions.setdefault(task, set()).update(values)

    def rows(self) -> list[dict[str, Any]]:
        """Stand-in rows with the same candidate union and condition set per task."""
        out: list[dict[str, Any]] = []
        for task in self._candidates:
            conditions = sorted(self._conditions[task])
            out.append(
                {"task": task, "candidates": sorted(self._candidates[task]), "condition": conditions[0]}
            )
            out += [{"task": task, "candidates": [], "condition": c} for c in conditions[1:]]
        return out


class ShardWriter:
    """A ``DatasetDict`` folder (``save_to_disk``'s layout) written one table at a time.

    Each split's tables go to Arrow stream files of at most ``shard_rows`` rows; :meth:`close` names them
    ``data-NNNNN-of-NNNNN.arrow`` in the order written and writes the JSON files ``load_from_disk`` reads.
    """

    def __init__(self, folder: Path, features: Features, splits: Sequence[str], shard_rows: int = 100_000):
        self.folder = Path(folder)
        self.features = features
        self.splits = list(splits)
        self.shard_rows = shard_rows
        self._files: dict[str, list[Path]] = {s: [] for s in self.splits}
        self._writer: dict[str, Any] = {}
        self._rows: dict[str, int] = {}
        self.n_rows: dict[str, int] = {s: 0 for s in self.splits}
        for split in self.splits:
            (self.folder / split).mkdir(parents=True, exist_ok=True)

    def _open(self, split: str):
        from datasets.arrow_writer import ArrowWriter

        path = self.folder / split / f".part-{os.getpid()}-{len(self._files[split]):05d}.arrow"
        self._files[split].append(path)
        self._writer[split] = ArrowWriter(features=self.features, path=str(path))
        self._rows[split] = 0
        return self._writer[split]

    def _close_shard(self, split: str) -> None:
        writer = self._writer.pop(split, None)
        if writer is not None:
            writer.finalize()
            writer.close()

    def write(self, split: str, table: pa.Table) -> None:
        """Append ``table`` (the record schema) to ``split``."""
        if len(table) == 0:
            return
        writer = self._writer.get(split)
        if writer is None or self._rows[split] >= self.shard_rows:
            self._close_shard(split)
            writer = self._open(split)
        writer.write_table(table)
        self._rows[split] += len(table)
        self.n_rows[split] += len(table)

    def add_file(self, split: str, path: Path, n_rows: int) -> None:
        """A shard another process wrote (same schema), placed after what was written so far."""
        self._close_shard(split)
        self._files[split].append(Path(path))
        self.n_rows[split] += n_rows

    def close(self) -> None:
        from datasets.fingerprint import generate_random_fingerprint

        info = asdict(DatasetInfo(features=self.features))
        for split in self.splits:
            self._close_shard(split)
            if not self._files[split]:  # an empty split still needs one (empty) file
                self._open(split)
                self._close_shard(split)
            files = self._files[split]
            names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
            for path, name in zip(files, names, strict=True):
                path.replace(self.folder / split / name)
            state = {
                "_data_files": [{"filename": n} for n in names],
                # random, as for a dataset loaded from files: a cached .map() of an earlier preparation in
                # this folder must never be taken for this one's
                "_fingerprint": generate_random_fingerprint(),
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": None,
            }
            (self.folder / split / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
            (self.folder / split / "dataset_info.json").write_text(
                json.dumps({k: info[k] for k in sorted(info)}, indent=2)
            )
        (self.folder / "dataset_dict.json").write_text(json.dumps({"splits": self.splits}))
