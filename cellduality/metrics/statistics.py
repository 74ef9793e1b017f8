"""Statistics every metric is built on, on plain arrays: correlations, shares, means, Spearman-Brown.

Each is hand-written where it is called per completion (the verifier rewards), where scipy's per-call
overhead and its warnings on constant input are unwelcome; the tests hold them equal to scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NAN = float("nan")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; ``nan`` for fewer than two points, non-finite values or a constant vector.

    Hand-written (same value as ``scipy.stats.pearsonr``) because it is called per completion in the
    verifier rewards, where scipy's per-call overhead and its warnings on constant input are unwelcome.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den <= 0.0:
        return NAN
    return float(np.clip(float(xc @ yc) / den, -1.0, 1.0))


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between every row of ``a`` and every row of ``b`` (an ``a`` x ``b`` matrix); ``nan``
    for a constant row. All pairs in one product, for retrieval over many perturbations."""

    def standardise(x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(xc, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, xc / norm, NAN)

    return standardise(a) @ standardise(b).T


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties averaged (``scipy.stats.rankdata``'s default), without its per-call cost."""
    n = x.size
    order = np.argsort(x, kind="stable")
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    xs = x[order]
    first = np.concatenate(([True], xs[1:] != xs[:-1]))
    dense = np.cumsum(first)[inverse]
    bounds = np.concatenate((np.flatnonzero(first), [n]))
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho (average ranks for ties), i.e. Pearson of the ranks; ``nan`` when degenerate.

    Same value as ``scipy.stats.spearmanr`` (tested); ranked by hand because the verifier rewards call it
    once per completion and ``rankdata``'s overhead dominated their cost.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    return pearson(average_ranks(x.ravel()), average_ranks(y.ravel()))


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine similarity in [-1, 1]; ``nan`` for empty or non-finite input or a zero vector."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.clip(float(x @ y) / den, -1.0, 1.0)) if den > 0 else NAN


def rmse(x: np.ndarray, y: np.ndarray) -> float:
    """Root-mean-square difference; ``nan`` for no values or a non-finite difference."""
    err = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if err.size == 0:
        return NAN
    return float(np.sqrt(np.mean(err**2))) if np.isfinite(err).all() else NAN


def share(flags: Sequence[bool] | np.ndarray) -> float:
    """The share of true flags (a rate); ``nan`` over no items: nothing was measured."""
    return float(np.mean(flags)) if len(flags) else NAN


def nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the finite values; ``nan`` when none is finite (summaries skip what was not measurable)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else NAN


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Spearman-Brown prophecy for a positive correlation: ``f r / (1 + (f - 1) r)``; ``r <= 0`` unchanged.

    The prophecy predicts the reliability of a ``factor`` times larger sample from a *positive*
    reliability. A negative split-half correlation says the two halves do not reproduce each other; the
    formula would inflate it (r = -0.6 -> -3.0, below -1, which no correlation can be), so such values
    are returned uncorrected and every result stays in [-1, 1]. ``nan`` stays ``nan``.
    """
    if not np.isfinite(r):
        return float("nan")
    if r <= 0:
        return float(r)
    return float(factor * r / (1.0 + (factor - 1.0) * r))


__all__ = [
    "NAN",
    "average_ranks",
    "cosine",
    "nanmean",
    "pearson",
    "pearson_rows",
    "rmse",
    "share",
    "spearman",
    "spearman_brown",
]
