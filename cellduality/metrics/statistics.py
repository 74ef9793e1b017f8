"""Statistics every metric is built on, on plain arrays."""

from __future__ import annotations

import math

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


__all__ = ["NAN", "pearson"]
