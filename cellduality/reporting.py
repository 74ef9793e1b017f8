"""Human-readable console output (rich tables) for what the commands built."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from cellduality.tasks import PreparedTasks


def print_prepared(prepared: PreparedTasks, out: Path | None = None, console: Console | None = None) -> None:
    """Rows per task and split, genes per sentence, the rank fit and every fix applied to the data."""
    console = console or Console()
    meta = prepared.meta
    table = Table(title=f"{meta['dataset']}: task examples" + (f" -> {out}" if out else ""))
    for col in ("task", "split", "rows", "genes per input", "genes per answer"):
        table.add_column(col, justify="right" if col not in ("task", "split") else "left")
    for row in meta["summary"]:
        table.add_row(
            row["task"],
            row["split"],
            str(row["rows"]),
            f"{row['input_genes']:.1f}",
            f"{row['answer_genes']:.1f}",
        )
    console.print(table)
    fit = meta["fit"]
    console.print(
        f"  cells: {meta['n_cells']} ({meta['n_empty_dropped']} empty dropped), genes: {len(meta['genes'])}, "
        f"values: {meta['value_type']}"
    )
    console.print(
        f"  rank -> expression fit: expr = {fit['slope']:.3f} * log10(rank) + {fit['intercept']:.3f}, "
        f"R^2 = {fit['r2']:.3f}"
    )
    for task, info in meta["split"].items():
        if info["mode"] == "ood":
            console.print(f"  {task}: OOD split on {info['key']!r}, held out: {', '.join(info['holdout'])}")
    for note in meta["notes"]:
        console.print(f"  note: {note}")
