"""The array shapes every metric takes: cells x genes matrices (dense or sparse), mean profiles, deltas.

Expression inputs are cells x genes matrices (numpy or scipy sparse) of log-normalised values, or 1-D
vectors that are taken to be a mean profile already. A *delta* is a mean profile minus the control mean.
Written once here because the metrics, the baselines and the verifier rewards all convert the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from cellduality.metrics.statistics import NAN

Matrix = Any
"""A cells x genes matrix: ``numpy.ndarray`` or a ``scipy.sparse`` matrix/array (or a 1-D mean profile)."""


def dense(x: Matrix) -> np.ndarray:
    """Dense floating array; float32 stays float32 (half the memory and time in PCA and kNN)."""
    arr = x.toarray() if sp.issparse(x) else np.asarray(x)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


def finite_rows(x: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Dense matrix and a mask of rows whose values are all finite (NaN rows = invalid outputs)."""
    arr = np.atleast_2d(dense(x))
    if arr.shape[0] == 0:
        return arr, np.zeros(0, dtype=bool)
    return arr, np.isfinite(arr).all(axis=1)


def mean_profile(cells: Matrix) -> np.ndarray:
    """Mean expression per gene over the rows of ``cells``; a 1-D input is returned as a float copy.

    A matrix with no rows gives an all-``nan`` vector, so downstream scores become ``nan`` instead of
    raising (an empty prediction set is a degenerate model output, not a programming error).
    """
    if sp.issparse(cells):
        if cells.shape[0] == 0:
            return np.full(cells.shape[1], NAN)
        return np.asarray(cells.mean(axis=0), dtype=float).ravel()
    arr = np.asarray(cells, dtype=float)
    if arr.ndim == 1:
        return arr.copy()
    if arr.shape[0] == 0:
        return np.full(arr.shape[1], NAN)
    return arr.mean(axis=0)


def deltas(predicted: Matrix, control: Matrix, observed: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """The predicted and observed deltas: ``mean(predicted) - mean(control)``, ``mean(observed) - mean(control)``."""
    ctrl = mean_profile(control)
    return mean_profile(predicted) - ctrl, mean_profile(observed) - ctrl


def cell_delta(cell: np.ndarray | None, control_mean: np.ndarray) -> np.ndarray | None:
    """One cell's delta from the control mean; ``None`` for no cell, a wrong length or non-finite values."""
    if cell is None:
        return None
    x = np.asarray(cell, dtype=float).ravel()
    ctrl = np.asarray(control_mean, dtype=float).ravel()
    if x.shape != ctrl.shape or not np.isfinite(x).all():
        return None
    return x - ctrl


__all__ = ["Matrix", "cell_delta", "deltas", "dense", "finite_rows", "mean_profile"]
