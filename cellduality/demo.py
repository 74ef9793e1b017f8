"""The end-to-end demo on embedded real data (prepare stage; training and eval join as they land)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cellduality.data import load_dataset
from cellduality.reporting import print_prepared
from cellduality.tasks import TaskConfig, build_tasks, save_prepared

DEMO_DATASETS = ("pbmc68k", "scad_plx4720", "norman_devel", "glioblastoma_panobinostat")


def run_demo(out: Path = Path("demo_out"), quick: bool = False, seed: int = 0) -> Path:
    """Prepare every embedded dataset for every task it supports and report what was built."""
    console = Console()
    cfg = TaskConfig(top_k=32 if quick else 64, max_examples=200 if quick else None, seed=seed)
    for name in DEMO_DATASETS:
        console.rule(f"[bold]{name}")
        data = load_dataset(name)
        prepared = build_tasks(data, config=cfg)
        path = save_prepared(prepared, Path(out) / "prepared" / name)
        print_prepared(prepared, path, console)
    console.print(f"[bold green]Prepared datasets written under {Path(out) / 'prepared'}")
    return Path(out)
