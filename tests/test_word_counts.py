"""``word_counts`` (the summary's answer lengths, read from Arrow bytes) counts as ``str.split`` does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cellduality.tasks.output import word_counts

TRICKY = [
    "GENE1 GENE2 GENE3",
    "  leading and trailing  ",
    "",
    None,
    "tab\tnew\nline\rcarriage\x0bvertical\x0cform",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",
    "\t \n",
    "one",
    "a  b   c",
    "no\u00a0break space",  # a Unicode space: Python splits on it, so the row goes to Python
    "ideographic\u3000space and é",
    "x\x85y",  # NEL is a space to str.split
    "zero\u200bwidth",  # not a space to str.split
    "CD14+ Monocyte",
]


def _want(values: list[str | None]) -> list[int]:
    return [len((v or "").split()) for v in values]


def test_word_counts_is_str_split_on_tricky_strings() -> None:
    assert word_counts(pa.array(TRICKY, type=pa.string())).tolist() == _want(TRICKY)
    assert word_counts(pa.array(TRICKY, type=pa.large_string())).tolist() == _want(TRICKY)


def test_word_counts_of_slices_chunks_and_empty_columns() -> None:
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ab \t\n\x1fé\u00a0"), dtype=object)
    values = ["".join(rng.choice(alphabet, rng.integers(0, 12))) for _ in range(2_000)]
    column = pa.array(values, type=pa.string())
    assert word_counts(column).tolist() == _want(values)
    assert word_counts(column.slice(777, 500)).tolist() == _want(values[777:1277])  # offset into the buffers
    chunked = pa.chunked_array([column.slice(0, 10), column.slice(10, 0), column.slice(10)])
    assert word_counts(chunked).tolist() == _want(values)
    assert word_counts(pa.array([], type=pa.string())).tolist() == []
    assert word_counts(pa.array(["", None, ""], type=pa.string())).tolist() == [0, 0, 0]
    assert word_counts(pa.chunked_array([], type=pa.string())).tolist() == []
