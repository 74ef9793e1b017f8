"""Use a trained checkpoint on your own cells: AnnData in, AnnData out.

    from cellduality.predict import annotate, generate, perturb, predict
    annotate(adata, "demo_out/grpo")                       # obs: cellduality_label/_valid/_confidence
    cells = generate("demo_out/grpo", {"CD14+ Monocyte": 200})
    pred = perturb(controls, "demo_out/grpo", ["KLF1", "MAP2K6+KLF1"])   # cell-eval's layout

Every setting (sentence length, genes, candidates, rank -> expression fit) comes from the checkpoint's
run metadata. ``cellduality predict`` is the command-line form (``docs/predict.md``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

TASKS = ("annotation", "generation", "perturbation")

# Loaded on first use, so `cellduality --help` (which imports .command) does not import scanpy.
_LAZY = {
    "Checkpoint": "cellduality.predict.checkpoint",
    "find_run_meta": "cellduality.predict.checkpoint",
    **{
        name: "cellduality.predict.run"
        for name in (
            "align_real",
            "annotate",
            "cell_eval_command",
            "generate",
            "parse_counts",
            "parse_perturbations",
            "perturb",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellduality.predict' has no attribute {name!r}")


def predict(adata: Any, model: str | Path, task: str = "annotation", **kwargs: Any):
    """One entry point for the three uses: ``task`` = annotation (``adata``: cells to annotate),
    generation (``adata`` unused, pass ``conditions=``), perturbation (``adata``: control cells, pass
    ``perturbations=``). Returns an AnnData; see :func:`annotate`, :func:`generate`, :func:`perturb`."""
    from cellduality.data.schema import DataError
    from cellduality.predict.run import annotate, generate, perturb

    if task == "annotation":
        return annotate(adata, model, **kwargs)
    if task == "generation":
        if "conditions" not in kwargs:
            raise DataError("task generation needs conditions, e.g. {'CD14+ Monocyte': 200}")
        return generate(model, kwargs.pop("conditions"), **kwargs)
    if task == "perturbation":
        if "perturbations" not in kwargs:
            raise DataError("task perturbation needs perturbations, e.g. ['KLF1', 'MAP2K6+KLF1']")
        return perturb(adata, model, kwargs.pop("perturbations"), **kwargs)
    raise DataError(f"unknown task {task!r}; predict does {', '.join(TASKS)}")


__all__ = [
    "TASKS",
    "Checkpoint",
    "align_real",
    "annotate",
    "cell_eval_command",
    "find_run_meta",
    "generate",
    "parse_counts",
    "parse_perturbations",
    "perturb",
    "predict",
]
