"""Verifier rewards' formulas: ONE generated cell scored against the observed mean delta of its perturbation.

The observed response is ground truth, so a single sampled cell can be scored without a dual task
(PerturbCellRL-style rewards for perturbation GRPO). The scores are those of
:mod:`cellduality.metrics.perturbation` and :mod:`cellduality.metrics.pathways`, applied to the cell's
delta from the control mean and mapped to a reward range. A reward is never ``nan``: no cell (``None``:
the output did not parse), a wrong length, non-finite values or a degenerate score give the lowest value
of its range (the contract gives malformed output the lowest reward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cellduality.metrics.arrays import cell_delta
from cellduality.metrics.pathways import PathwayWeights, pathway_activity
from cellduality.metrics.perturbation import pearson_delta_on_de, rmse_on_de, spearman_on_de
from cellduality.metrics.statistics import NAN, cosine


def verifier_pearson_de(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """Pearson r, in [-1, 1], of one cell's delta (cell - control mean) vs the observed mean delta on DE genes.

    ``de_idx`` defaults to the top ``n_de`` genes by ``|observed_delta|`` (pass it precomputed when
    scoring many cells). Degenerate input or a constant delta -> -1.0, the lowest reward.
    """
    delta = cell_delta(cell, control_mean)
    r = pearson_delta_on_de(delta, observed_delta, de_idx, n_de) if delta is not None else NAN
    return r if math.isfinite(r) else -1.0


def verifier_rmse_de(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """``1 / (1 + RMSE)`` of one cell's delta vs the observed mean delta on DE genes, in (0, 1].

    The negative RMSE mapped to (0, 1]: 1 for an exact match, falling smoothly with the error size.
    Degenerate input (see :func:`verifier_pearson_de`) -> 0.0.
    """
    delta = cell_delta(cell, control_mean)
    error = rmse_on_de(delta, observed_delta, de_idx, n_de) if delta is not None else NAN
    return 1.0 / (1.0 + error) if math.isfinite(error) else 0.0


def verifier_de_spearman(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """``(rho + 1) / 2`` for the Spearman rho of one cell's delta vs the observed delta on DE genes.

    Rewards ordering the effects right regardless of scale, in [0, 1]. Degenerate input -> 0.0.
    """
    delta = cell_delta(cell, control_mean)
    rho = spearman_on_de(delta, observed_delta, de_idx, n_de) if delta is not None else NAN
    return (rho + 1.0) / 2.0 if math.isfinite(rho) else 0.0


def verifier_pathway(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    weights: PathwayWeights,
) -> float:
    """``(cosine + 1) / 2`` of one cell's pathway activities vs the observed ones, in [0, 1].

    ``weights`` comes from :func:`cellduality.metrics.pathways.align_pathway_weights` (align once, score
    many cells). Cosine rather than Pearson because 14 pathway scores are too few to centre reliably.
    Degenerate input (no cell, no shared gene, a zero activity vector) -> 0.0.
    """
    delta = cell_delta(cell, control_mean)
    if delta is None or weights.n_shared == 0:
        return 0.0
    obs = np.asarray(observed_delta, dtype=float).ravel()
    c = cosine(pathway_activity(delta, weights), pathway_activity(obs, weights))
    return (c + 1.0) / 2.0 if math.isfinite(c) else 0.0


__all__ = ["verifier_de_spearman", "verifier_pathway", "verifier_pearson_de", "verifier_rmse_de"]
