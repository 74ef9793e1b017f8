"""Example rows built as Arrow columns: the record table of a chunk of examples without a dict per row.

The builders (``classification``, ``generative``) take their random draws for a whole chunk from
:mod:`cellduality.tasks.draws` and assemble each record column here: gene lists by one ``take`` from
the gene symbols (:func:`cellduality.sentences.gene_lists`), prompts by filling each template's
literal pieces and fields element-wise (:func:`format_column`), the two chat messages as a list of
structs (:func:`prompt_column`). The values are those of the per-example functions
(``annotation_example``, ``generation_example``, ``perturbation_example``), which ``predict`` uses and
``tests/test_tasks_columns.py`` compares against.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Features, Value
from datasets import Sequence as HFSequence

from cellduality.tasks.common import RECORD_COLUMNS
from cellduality.tasks.templates import SYSTEM_PROMPT

#: the record contract's columns and types (every task's rows in one table)
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
#: its Arrow schema, the type of every builder's table
SCHEMA = FEATURES.arrow_schema


def strings(values: Sequence[str] | np.ndarray) -> pa.Array:
    """A Python sequence of str as an Arrow string array."""
    return pa.array(values if isinstance(values, list) else list(values), type=pa.string())


def join_lists(lists: pa.Array, sep: str) -> pa.Array:
    """``sep.join(row)`` of every row of a ``list<string>`` column (an empty row gives "")."""
    if len(lists) == 0:
        return pa.array([], type=pa.string())
    return pc.binary_join(lists, sep)


def take_lists(values: pa.Array, index: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """Row r: ``values[index[r, j]]`` for j < ``lengths[r]``."""
    valid = np.arange(index.shape[1])[None, :] < lengths[:, None]
    offsets = np.zeros(index.shape[0] + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(index[valid], type=pa.int64())))


def format_column(templates: Sequence[str], which: np.ndarray, fields: Mapping[str, Any]) -> pa.Array:
    """``templates[which[r]].format(**row r of fields)`` for every row r, as Arrow strings.

    A field is an Arrow string array (one value per row) or a plain value (the same in every row,
    formatted with ``str``, as ``format`` does for an int or a string). Rows of one template are joined
    piece by piece in Arrow, then put back in row order.
    """
    which = np.asarray(which, dtype=np.int64)
    n = which.size
    parts, rows_of = [], []
    for t, template in enumerate(templates):
        rows = np.flatnonzero(which == t)
        if rows.size == 0:
            continue
        take = pa.array(rows, type=pa.int64())
        pieces: list[Any] = []
        for literal, name, spec, conversion in string.Formatter().parse(template):
            if literal:
                pieces.append(literal)
            if name is None:
                continue
            if spec or conversion:
                raise ValueError(
                    f"template field {{{name}}} with a format spec is not supported: {template!r}"
                )
            value = fields[name]
            pieces.append(value.take(take) if isinstance(value, pa.Array) else str(value))
        if not any(isinstance(p, pa.Array) for p in pieces):
            parts.append(pa.array(["".join(pieces)] * rows.size, type=pa.string()))
        else:
            scalars = [p if isinstance(p, pa.Array) else pa.scalar(p, pa.string()) for p in pieces]
            parts.append(pc.binary_join_element_wise(*scalars, pa.scalar("", pa.string())))
        rows_of.append(rows)
    if not parts:
        return pa.array([], type=pa.string())
    joined = pa.concat_arrays(parts)
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(rows_of)] = np.arange(n)
    return joined.take(pa.array(inverse))


def prompt_column(user: pa.Array) -> pa.Array:
    """The chat of every row: the system prompt, then the row's user message (``common.messages``)."""
    n = len(user)
    roles = pa.array(["system", "user"] * n, type=pa.string())
    contents = pa.concat_arrays([pa.array([SYSTEM_PROMPT], type=pa.string()), user.cast(pa.string())])
    interleave = np.zeros(2 * n, dtype=np.int64)
    interleave[1::2] = np.arange(1, n + 1)
    messages = pa.StructArray.from_arrays(
        [roles, contents.take(pa.array(interleave))], names=["role", "content"]
    )
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), messages)


def record_table(n: int, schema: pa.Schema, **columns: Any) -> pa.Table:
    """A record table of ``n`` rows: the given columns (Arrow arrays, or lists/one value to repeat),
    every other column empty as ``common.record`` leaves it (empty string, empty list, 0)."""
    unknown = columns.keys() - set(RECORD_COLUMNS)
    if unknown:
        raise KeyError(f"not record columns: {sorted(unknown)}")
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        if isinstance(value, pa.Array | pa.ChunkedArray):
            arrays.append(value.cast(field.type) if value.type != field.type else value)
        elif isinstance(value, list):
            arrays.append(pa.array(value, type=field.type))
        elif pa.types.is_list(field.type):
            if value is not None:
                raise TypeError(f"column {field.name}: a list column needs one list per row")
            empty = pa.array([], type=field.type.value_type)
            arrays.append(pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), empty))
        else:
            default = 0 if pa.types.is_integer(field.type) else ""
            arrays.append(pa.array([default if value is None else value] * n, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
