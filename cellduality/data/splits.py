"""In-distribution and out-of-distribution splits of cells.

In-distribution (``id``): a seeded random fraction of cells is held out. Out-of-distribution (``ood``):
whole values of a key column (cell types, perturbations, drugs) are held out, so the test set asks about
conditions the model never trained on. Control cells are never held out as a condition: they are inputs
to the perturbation task, and are split at random instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellduality.data.schema import DataError

SPLITS = ("id", "ood")


@dataclass(frozen=True)
class Split:
    """Cell positions of each split, and the held-out values of an OOD split."""

    train: np.ndarray
    test: np.ndarray
    mode: str
    key: str | None = None
    holdout: tuple[str, ...] = ()


def split_cells(
    obs: pd.DataFrame,
    *,
    mode: str = "id",
    key: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    holdout: Sequence[str] | None = None,
    control_value: str | None = None,
) -> Split:
    """Split the cells of ``obs`` (positions, not names) into train and test."""
    if mode not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {mode!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(obs)
    rng = np.random.default_rng(seed)
    if mode == "id" and holdout:
        raise DataError(
            "--holdout names values to hold out of an out-of-distribution split, but the split is id "
            "(random cells): add --split ood, or drop --holdout"
        )
    if mode == "id":
        if n < 2:
            raise DataError(
                f"only {n} cell{'s' if n != 1 else ''} to split: a train/test split needs at least 2 cells "
                "(in practice dozens per class)"
            )
        order = rng.permutation(n)
        n_test = max(1, round(n * test_fraction))
        return Split(np.sort(order[n_test:]), np.sort(order[:n_test]), "id")
    if key is None or key not in obs.columns:
        raise DataError(
            f"an out-of-distribution split needs a key column; got {key!r}, "
            f"columns that exist: {', '.join(map(str, obs.columns))}"
        )
    values = obs[key].astype(str).to_numpy()
    is_control = values == control_value if control_value is not None else np.zeros(n, dtype=bool)
    candidates = sorted(set(values[~is_control]))
    if holdout is None:
        if len(candidates) < 2:
            raise DataError(
                f"an out-of-distribution split holds out values of {key!r}, but there is only "
                f"{len(candidates)} ({', '.join(candidates)}); use --split id"
            )
        n_hold = min(len(candidates) - 1, max(1, round(len(candidates) * test_fraction)))
        holdout = sorted(rng.choice(candidates, size=n_hold, replace=False).tolist())
    else:
        if control_value is not None and str(control_value) in set(map(str, holdout)):
            raise DataError(
                f"--holdout {control_value!r}: that is the control value, and control cells are never held "
                "out (both splits need them as the cells a perturbation is applied to); hold out "
                f"perturbations instead, e.g. {', '.join(candidates[:3])}"
            )
        unknown = sorted(set(holdout) - set(candidates))
        if unknown:
            shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
            raise DataError(f"held-out values {unknown} are not values of {key!r}; its values: {shown}")
        if set(holdout) == set(candidates):
            raise DataError("holding out every value leaves nothing to train on")
    held = np.isin(values, list(holdout)) & ~is_control
    test = np.flatnonzero(held)
    train = np.flatnonzero(~held & ~is_control)
    controls = np.flatnonzero(is_control)
    if controls.size:
        perm = rng.permutation(controls)
        n_test = max(1, round(controls.size * test_fraction)) if controls.size > 1 else 0
        test = np.concatenate([test, perm[:n_test]])
        train = np.concatenate([train, perm[n_test:]])
    return Split(np.sort(train), np.sort(test), "ood", key, tuple(str(h) for h in holdout))
