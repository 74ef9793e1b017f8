"""Markdown tables of the evaluation's reports: a cell's number format and the table itself.

Shared by the report (:mod:`cellduality.eval.report`) and the sections it takes from others (cell-eval's,
:mod:`cellduality.eval.cell_eval`), so every table formats its numbers alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cellduality.metrics.registry import metric_info


def fmt(value: Any, key: str = "") -> str:
    """A table cell: 3 decimals, counts (the registry's ``count`` metrics) as integers, ``—`` for not measurable."""
    if value is None:
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(f):
        return "—"
    if metric_info(key).count:
        return str(round(f))
    return f"{f:.3f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["fmt", "markdown_table"]
