"""A perturbation's response scored against the observed one: correlations, errors and retrieval.

A *delta* is a change from the control mean, one value per gene: ``mean(predicted) - mean(control)``
for a prediction (a set of cells, or one cell), ``mean(observed) - mean(control)`` for the truth. The DE
genes are chosen from the observed delta alone, so every predictor is scored on the same genes.

Each score is written once, on deltas (``*_on_de``); the functions on cells x genes matrices
(``pearson_delta_de``, ``rmse_de``, ``de_spearman``, :func:`perturbation_metrics`) and the single-cell
verifier rewards (:mod:`cellduality.metrics.verifier`) compute the deltas and call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellduality.metrics.arrays import Matrix, deltas
from cellduality.metrics.pathways import PathwayWeights, pathway_agreement
from cellduality.metrics.statistics import NAN, pearson, pearson_rows, rmse, spearman


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
    pred, obs, idx = _on_de(predicted_delta, observed_delta, de_idx, n_de, gene_names, de_genes)
    return pearson(pred[idx], obs[idx])


def rmse_on_de(
    predicted_delta: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
) -> float:
    """Root-mean-square error of the deltas on the DE genes (equal to the RMSE of the mean profiles there).

    Unlike a correlation it penalises the wrong *magnitude* of the response. ``nan`` with no DE gene or
    non-finite values. DE genes as in :func:`pearson_delta_on_de`.
    """
    pred, obs, idx = _on_de(predicted_delta, observed_delta, de_idx, n_de, gene_names, de_genes)
    return rmse(pred[idx], obs[idx])


def spearman_on_de(
    predicted_delta: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
) -> float:
    """Spearman rho of the deltas on the DE genes: the right *ordering* of effects, whatever their scale."""
    pred, obs, idx = _on_de(predicted_delta, observed_delta, de_idx, n_de, gene_names, de_genes)
    return spearman(pred[idx], obs[idx])


def _on_de(
    predicted_delta: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None,
    n_de: int,
    gene_names: Sequence[str] | None,
    de_genes: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both deltas as flat float vectors and the DE genes' indices (``de_idx``, or chosen from the observed)."""
    pred = np.asarray(predicted_delta, dtype=float).ravel()
    obs = np.asarray(observed_delta, dtype=float).ravel()
    if de_idx is None:
        return pred, obs, de_gene_indices(obs, n_de, gene_names, de_genes)
    return pred, obs, np.asarray(de_idx, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# on cells x genes matrices (or mean profiles): the deltas from the control, then the scores above


def pearson_delta(
    predicted: Matrix, control: Matrix, observed: Matrix, genes: np.ndarray | Sequence[int] | None = None
) -> float:
    """Pearson r between predicted and observed deltas from the control mean, on all genes or ``genes``.

    ``mean(pred) - mean(ctrl)`` vs ``mean(obs) - mean(ctrl)``: correlating deltas, not raw means,
    removes the baseline expression that any predictor gets right for free. ``nan`` when degenerate
    (constant delta, fewer than two genes, no cells).
    """
    pred_delta, obs_delta = deltas(predicted, control, observed)
    if genes is not None:
        idx = np.asarray(genes, dtype=np.int64)
        pred_delta, obs_delta = pred_delta[idx], obs_delta[idx]
    return pearson(pred_delta, obs_delta)


def pearson_delta_de(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """Pearson delta on the top ``n_de`` DE genes (or the supplied ``de_genes``); see :func:`de_gene_indices`."""
    return pearson_delta_on_de(
        *deltas(predicted, control, observed), n_de=n_de, gene_names=gene_names, de_genes=de_genes
    )


def rmse_de(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """:func:`rmse_on_de` of the mean profiles' deltas on the top ``n_de`` (or the named) DE genes."""
    return rmse_on_de(
        *deltas(predicted, control, observed), n_de=n_de, gene_names=gene_names, de_genes=de_genes
    )


def de_spearman(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """:func:`spearman_on_de` of the mean profiles' deltas on the top ``n_de`` (or the named) DE genes."""
    return spearman_on_de(
        *deltas(predicted, control, observed), n_de=n_de, gene_names=gene_names, de_genes=de_genes
    )


def retrieval_scores(
    predicted_deltas: np.ndarray,
    observed_deltas: np.ndarray,
    genes: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Normalised rank of the true perturbation when retrieving it from its predicted delta.

    Row ``p`` of both arrays belongs to perturbation ``p`` (P perturbations x G genes). With
    ``r[p, q] = pearson(predicted_deltas[p], observed_deltas[q])`` (over ``genes`` if given)::

        score[p] = (#{q != p : r[p, q] < r[p, p]} + 0.5 * #{q != p : r[p, q] == r[p, p]}) / (P - 1)

    i.e. the fraction of the *other* perturbations that the prediction resembles less than its own, ties
    counted half. 1.0: the prediction is closer to its own perturbation than to any other; 0.0: closer to
    every other one. A random predictor makes ``r[p, p]`` exchangeable with the ``r[p, q]``, so its
    expected score is exactly 0.5, whatever P. This catches predictors that output the same
    "average perturbation" for everything, which correlation with the truth alone rewards. A ``nan``
    correlation (constant vector, non-finite values) counts as the lowest similarity, so a constant
    prediction ties with everything and scores 0.5. Fewer than two perturbations -> all ``nan``.
    """
    pred = np.atleast_2d(np.asarray(predicted_deltas, dtype=float))
    obs = np.atleast_2d(np.asarray(observed_deltas, dtype=float))
    if pred.shape != obs.shape:
        raise ValueError(f"predicted {pred.shape} and observed {obs.shape} deltas differ in shape")
    n = pred.shape[0]
    if n < 2:
        return np.full(n, NAN)
    if genes is not None:
        idx = np.asarray(genes, dtype=np.int64)
        pred, obs = pred[:, idx], obs[:, idx]
    pred = np.where(np.isfinite(pred), pred, NAN)
    corr = pearson_rows(pred, obs)
    corr = np.where(np.isfinite(corr), corr, -np.inf)
    own = np.diag(corr)[:, None]
    others = ~np.eye(n, dtype=bool)
    below = ((corr < own) & others).sum(axis=1)
    ties = ((corr == own) & others).sum(axis=1)
    return (below + 0.5 * ties) / (n - 1)


def perturbation_metrics(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
    pathway_weights: PathwayWeights | None = None,
) -> dict[str, float]:
    """All per-perturbation metrics in one dict (deltas and DE genes computed once).

    Keys: ``pearson_delta``, ``pearson_delta_de``, ``rmse_de``, ``de_spearman``, ``n_de``, and with
    ``pathway_weights`` also ``pathway_pearson``, ``pathway_cosine``, ``pathway_n_genes``. Retrieval and
    scFID need all perturbations / cells at once: see :func:`retrieval_scores` and
    :func:`cellduality.metrics.generation.scfid`.
    """
    pred_delta, obs_delta = deltas(predicted, control, observed)
    idx = de_gene_indices(obs_delta, n_de, gene_names, de_genes)
    out = {
        "pearson_delta": pearson(pred_delta, obs_delta),
        "pearson_delta_de": pearson_delta_on_de(pred_delta, obs_delta, idx),
        "rmse_de": rmse_on_de(pred_delta, obs_delta, idx),
        "de_spearman": spearman_on_de(pred_delta, obs_delta, idx),
        "n_de": float(idx.size),
    }
    if pathway_weights is not None:
        agree = pathway_agreement(pred_delta, np.zeros_like(pred_delta), obs_delta, pathway_weights)
        out.update(
            pathway_pearson=agree.pearson, pathway_cosine=agree.cosine, pathway_n_genes=float(agree.n_genes)
        )
    return out


__all__ = [
    "de_gene_indices",
    "de_spearman",
    "pearson_delta",
    "pearson_delta_de",
    "pearson_delta_on_de",
    "perturbation_metrics",
    "retrieval_scores",
    "rmse_de",
    "rmse_on_de",
    "spearman_on_de",
]
