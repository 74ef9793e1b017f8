"""A perturbation's response, scored on its differentially expressed genes, from plain delta vectors.

A *delta* is a change from the control mean, one value per gene: ``mean(predicted) - mean(control)``
for a prediction (a set of cells, or one cell), ``mean(observed) - mean(control)`` for the truth. The DE
genes are chosen from the observed delta alone, so every predictor is scored on the same genes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellduality.metrics.statistics import pearson


def de_gene_indices(
    observed_delta: np.ndarray,
    n_de: int = 20,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
) -> np.ndarray:
    """Indices of the differentially expressed genes the DE metrics are computed on.

    Given ``de_genes`` (with ``gene_names``), their positions, matched case-insensitively; unknown
    names are ignored. Otherwise the ``n_de`` genes with the largest ``|observed delta|`` (ties by gene
    order; non-finite deltas never chosen). Metrics on these genes matter because most genes do not
    respond to a perturbation, so an all-genes correlation is dominated by noise and by the control.
    """
    delta = np.asarray(observed_delta, dtype=float).ravel()
    if de_genes is not None:
        if gene_names is None:
            raise ValueError("de_genes needs gene_names to locate them")
        pos = {str(g).upper(): i for i, g in enumerate(gene_names)}
        idx = [pos[g.upper()] for g in de_genes if g.upper() in pos]
        return np.asarray(list(dict.fromkeys(idx)), dtype=np.int64)
    finite = np.flatnonzero(np.isfinite(delta))
    n = max(0, min(int(n_de), finite.size))
    order = np.argsort(-np.abs(delta[finite]), kind="stable")
    return finite[order[:n]]


def pearson_delta_on_de(
    predicted_delta: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
) -> float:
    """The Pearson delta on DE genes: Pearson r of the predicted and observed deltas on the DE genes.

    The DE genes are ``de_idx`` when given (computed once, scoring many predictions), else
    :func:`de_gene_indices` of ``observed_delta`` (``n_de``, or the named ``de_genes``). ``nan`` when
    degenerate: fewer than two DE genes, a non-finite value on them, or a constant delta there.
    """
    pred = np.asarray(predicted_delta, dtype=float).ravel()
    obs = np.asarray(observed_delta, dtype=float).ravel()
    if de_idx is None:
        idx = de_gene_indices(obs, n_de, gene_names, de_genes)
    else:
        idx = np.asarray(de_idx, dtype=np.int64)
    return pearson(pred[idx], obs[idx])


__all__ = ["de_gene_indices", "pearson_delta_on_de"]
