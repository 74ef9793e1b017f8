"""Prompts for prediction, built exactly as the task builders build training prompts.

Same templates (:mod:`cellduality.tasks.templates`), same seeded choices keyed by an example id, same
gene hiding for the in-painting dual, same record columns, so :mod:`cellduality.tasks.dual` builds and
scores the dual of a prediction as it does in training. ``tests/test_predict.py`` checks that these
functions give the training rows' prompts for the same cell and candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cellduality.tasks import classification, generative
from cellduality.tasks.common import TaskConfig

SPLIT = "predict"


def annotation_example(
    cell_id: str,
    sentence: Sequence[str],
    candidates: Sequence[str],
    cfg: TaskConfig,
    dataset: str,
    *,
    context: str = "",
    split: str = SPLIT,
    gene_scores: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """An annotation prompt for one cell (``candidates`` sorted, as the builder sorts them): the task
    builder's own per-cell function, :func:`cellduality.tasks.classification.annotation_example`."""
    return classification.annotation_example(
        cell_id, sentence, candidates, cfg, dataset, split=split, context=context, gene_scores=gene_scores
    )


def generation_example(
    key: str, condition: str, candidates: Sequence[str], cfg: TaskConfig, dataset: str, *, split: str = SPLIT
) -> dict[str, Any]:
    """A "generate a cell of this type" prompt; ``key`` makes each requested cell its own example
    (:func:`cellduality.tasks.generative.generation_example`)."""
    return generative.generation_example(key, condition, candidates, cfg, dataset, split=split)


def perturbation_example(
    key: str,
    control_genes: Sequence[str],
    condition: str,
    condition_text: str,
    others: Sequence[str],
    control_value: str,
    cfg: TaskConfig,
    dataset: str,
    *,
    context: str = "",
    cell_id: str = "",
) -> dict[str, Any]:
    """A "this control cell after that perturbation" prompt, seeded by ``dataset/perturbation/<split>/key``
    (:func:`cellduality.tasks.generative.perturbation_example`)."""
    return generative.perturbation_example(
        f"{dataset}/perturbation/{SPLIT}/{key}",
        control_genes,
        condition,
        condition_text,
        others,
        control_value,
        cfg,
        dataset,
        context=context,
        cell_id=cell_id,
    )


__all__ = ["annotation_example", "generation_example", "perturbation_example"]
