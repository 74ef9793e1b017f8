"""Classification metrics (annotation, drug sensitivity; also the dual of generation and perturbation).

Pure functions of label lists. An answer that names no label (``None``) stays in every denominator: a
model must not look better by refusing to answer. A rate over zero items is ``nan`` (nothing was
measured); over items that are all invalid it is ``0.0``.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from typing import Any

import numpy as np

from cellduality.metrics.statistics import NAN, share
from cellduality.parsing import parse_completion


def _codes(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable | None], labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for scikit-learn (much faster than string labels on 10k items).

    Label ``labels[i]`` -> ``i``; a true label outside ``labels`` -> -1; a prediction that is ``None`` or
    outside ``labels`` -> ``len(labels)``, the "invalid" code.
    """
    index = {str(lab): i for i, lab in enumerate(labels)}
    n = len(labels)
    t = np.fromiter((index.get(str(v), -1) for v in y_true), dtype=np.int64, count=len(y_true))
    p = np.fromiter(
        (n if v is None else index.get(str(v), n) for v in y_pred), dtype=np.int64, count=len(y_pred)
    )
    return t, p


def accuracy(y_true: Sequence[str], y_pred: Sequence[str | None]) -> float:
    """Fraction of predictions equal to the true label; ``None`` (no valid answer) counts as wrong.

    Invalid answers are kept in the denominator on purpose: a model must not look better by refusing to
    answer. Empty input -> ``nan``.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    return share([p is not None and p == t for t, p in zip(y_true, y_pred, strict=True)])


def macro_f1(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str] | None = None
) -> float:
    """Macro-averaged F1 over the classes present in ``y_true`` (or over ``labels`` when given).

    Macro-F1 weighs rare cell types like common ones, which accuracy does not. The default averages over
    the classes the test set holds, as scikit-learn's ``f1_score(labels=...)`` is meant to be used: a
    candidate label that never occurs in the test labels would add an F1 of 0 that no model can avoid
    (on an out-of-distribution split the score could then never reach 1). Predicting an absent class is
    still a miss for the true class (it lowers that class's recall). ``None`` predictions are misses too
    and never count as a predicted class. Pass ``labels`` only to average over a fixed label set on
    purpose. Empty -> ``nan``.
    """
    from sklearn.metrics import f1_score

    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        return NAN
    use = list(labels) if labels is not None else sorted({str(t) for t in y_true})
    if not use:
        return NAN
    t, p = _codes(y_true, y_pred, use)
    return float(f1_score(t, p, labels=np.arange(len(use)), average="macro", zero_division=0))


def confusion(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Confusion counts, shape ``(len(labels), len(labels) + 1)``: rows true, columns predicted.

    Rows and the first columns follow ``labels`` (so classes absent from the data still appear, as
    zeros); the extra last column counts invalid predictions (``None`` or a label outside ``labels``),
    which scikit-learn's own matrix would silently drop. Items whose true label is not in ``labels``
    are not counted.
    """
    from sklearn.metrics import confusion_matrix

    n = len(labels)
    if len(y_true) == 0 or n == 0:
        return np.zeros((n, n + 1), dtype=np.int64)
    t, p = _codes(y_true, y_pred, labels)
    return confusion_matrix(t, p, labels=np.arange(n + 1))[:n].astype(np.int64)


def valid_output_rate(
    y_pred: Sequence[str | None], candidates: Collection[str] | Sequence[Collection[str]] | None = None
) -> float:
    """Fraction of predictions that name a candidate label (``None`` = the answer named none).

    ``candidates`` is either one collection of labels shared by all rows or one collection per row (the
    prompt's candidate list); ``None`` only checks for ``None``. Empty -> ``nan``; all invalid -> 0.
    """
    if len(y_pred) == 0:
        return NAN
    if candidates is None:
        ok = [p is not None for p in y_pred]
    elif all(isinstance(c, str) for c in candidates):
        shared = set(candidates)  # type: ignore[arg-type]
        ok = [p is not None and p in shared for p in y_pred]
    else:
        per_row = list(candidates)
        if len(per_row) != len(y_pred):
            raise ValueError(f"{len(per_row)} candidate lists for {len(y_pred)} predictions")
        ok = [p is not None and p in set(c) for p, c in zip(y_pred, per_row, strict=True)]
    return share(ok)


def format_rate(completions: Sequence[Any]) -> float:
    """Fraction of completions in the exact contract shape ``<think>…</think><answer>…</answer>``.

    Separate from the valid-output rate because a model can answer a correct label in a broken format
    (or a well-formed nonsense label); both failure modes matter when reading a training run.
    Completions are strings or chat-message lists, as TRL hands them over. Empty -> ``nan``.
    """
    return share([parse_completion(c).well_formed for c in completions])


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str] | None = None,
    completions: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, valid-output rate and (given the raw ``completions``) format rate.

    ``labels`` (every label a prompt may offer) defines what a *valid* answer is; macro-F1 is averaged
    over the classes present in ``y_true`` only (see :func:`macro_f1`), whatever ``labels`` holds.
    """
    use = list(labels) if labels is not None else sorted({str(t) for t in y_true})
    out = {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "valid_output_rate": valid_output_rate(y_pred, use),
        "n": float(len(y_true)),
    }
    if completions is not None:
        out["format_rate"] = format_rate(completions)
    return out


__all__ = [
    "accuracy",
    "classification_metrics",
    "confusion",
    "format_rate",
    "macro_f1",
    "valid_output_rate",
]
