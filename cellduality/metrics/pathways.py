"""Pathway activity (PROGENy footprints) of a perturbation's response, and its agreement with the truth.

Does a prediction move the right *signalling programmes*? A coarser but more robust view than
gene-level correlation. The weights are the shipped PROGENy table (:mod:`cellduality.metrics.knowledge`)
aligned to a dataset's genes once, then applied to any number of deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cellduality.metrics.arrays import Matrix, deltas
from cellduality.metrics.knowledge import load_progeny
from cellduality.metrics.statistics import NAN, cosine, pearson

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class PathwayWeights:
    """Pathway weights aligned to a dataset's genes: ``matrix`` is genes x pathways, 0 for unknown genes."""

    matrix: np.ndarray
    pathways: tuple[str, ...]
    n_shared: int


def align_pathway_weights(gene_names: Sequence[str], weights: pd.DataFrame | None = None) -> PathwayWeights:
    """Align a genes x pathways weight table (default: PROGENy human top 100) to ``gene_names``.

    Matching is case-insensitive. ``n_shared`` is how many of the dataset's genes carry a weight: with
    few shared genes (a 500-HVG panel shares only tens) pathway activities rest on little evidence, so
    reports should show it next to the agreement.
    """
    if weights is None:
        weights = load_progeny()
    table = weights.groupby(weights.index.astype(str).str.upper()).first()
    upper = [str(g).upper() for g in gene_names]
    aligned = table.reindex(upper).fillna(0.0)
    shared = int(np.isin(upper, table.index).sum())
    return PathwayWeights(aligned.to_numpy(dtype=float), tuple(str(c) for c in table.columns), shared)


def pathway_activity(delta: np.ndarray, weights: PathwayWeights) -> np.ndarray:
    """Pathway activity of a delta (or of each row of a cells x genes delta): ``delta @ weights``.

    A PROGENy-style footprint score: genes move with the pathway's weight sign and size, summed over the
    genes shared with the weight table (non-finite deltas count as 0).
    """
    d = np.asarray(delta, dtype=float)
    return np.where(np.isfinite(d), d, 0.0) @ weights.matrix


class PathwayAgreement(NamedTuple):
    """Agreement of predicted and observed pathway activity vectors, and the evidence behind it."""

    pearson: float
    cosine: float
    n_genes: int


def pathway_agreement(
    predicted: Matrix, control: Matrix, observed: Matrix, weights: PathwayWeights
) -> PathwayAgreement:
    """Pearson and cosine similarity of predicted vs observed pathway activities (over pathways).

    This asks whether a prediction moves the right *signalling programmes*, a biologically coarser but
    more robust view than gene-level correlation. Cosine treats zero activity as "no change", which it
    is; Pearson ignores an overall offset shared by all pathways. ``nan`` when no gene is shared or an activity vector is zero.
    """
    pred_delta, obs_delta = deltas(predicted, control, observed)
    if weights.n_shared == 0 or not (np.isfinite(pred_delta).any() and np.isfinite(obs_delta).any()):
        return PathwayAgreement(NAN, NAN, weights.n_shared)
    a = pathway_activity(pred_delta, weights)
    b = pathway_activity(obs_delta, weights)
    return PathwayAgreement(pearson(a, b), cosine(a, b), weights.n_shared)


__all__ = [
    "PathwayAgreement",
    "PathwayWeights",
    "align_pathway_weights",
    "pathway_activity",
    "pathway_agreement",
]
