"""How a perturbation column is read: missing values, combination separators, control padding.

Screens name their conditions in several conventions. GEARS and the datasets built with it write a
single perturbation as ``A+ctrl`` (or ``ctrl+A``), a double as ``A+B`` and the controls as ``ctrl``;
others join targets with ``_`` or ``|``, or name controls ``non-targeting``. CellDuality reads every
genetic condition as a set of targets joined by ``Columns.combo_sep`` (default ``+``), drops the padding
tokens (``ctrl`` and the control value itself), and writes the result back as ``A`` or ``A+B``; a
condition made of padding only is a control cell. :func:`read_perturbations` returns the canonical
names and a note saying how the column was read (singles, doubles, controls), so the user can check it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Values of a label column that mean "no value" (compared case-insensitively, after stripping).
MISSING_MARKERS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})

#: Tokens that pad a genetic combination to a fixed arity (GEARS: ``A+ctrl``); never a target.
PADDING_TOKENS = frozenset({"ctrl"})

#: Separators that join targets in other conventions; mentioned in a note when they occur unused.
OTHER_SEPARATORS = ("_", "|", ";", ",")


def missing_mask(values: pd.Series | Sequence[object]) -> np.ndarray:
    """True where a value is NaN/None or a blank or "nan"-like string."""
    return label_text(values)[1]


def label_text(values: pd.Series | Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """Each value as ``str(value).strip()`` (``""`` where missing) and :func:`missing_mask`.

    A label column of an atlas holds 10^6 values and a few dozen distinct ones: when equal values
    have equal text (a categorical column, or one of strings only) each distinct value is stripped and
    compared once, then spread by its code. A column of mixed types (``1`` and ``1.0`` are equal but
    read differently) goes value by value.
    """
    series = pd.Series(values).reset_index(drop=True)
    distinct = _distinct(series)
    if distinct is None:
        return _each_text(series)
    codes, uniques = distinct
    text, missing = _each_text(uniques)
    text = np.append(text, "").astype(object)  # code -1 (NaN / None) reads the appended blank
    missing = np.append(missing, True)
    return text[codes], missing[codes]


def _each_text(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """:func:`label_text` value by value."""
    isna = series.isna().to_numpy()
    text = series.astype(str).str.strip()
    missing = isna | text.str.casefold().isin(MISSING_MARKERS).to_numpy()
    return np.where(missing, "", text.to_numpy(dtype=object)).astype(object), missing


def _distinct(series: pd.Series) -> tuple[np.ndarray, pd.Series] | None:
    """The codes (-1 where missing) and distinct values of a column whose equal values have equal text;
    ``None`` for any other column, or one with few rows (nothing to save)."""
    if len(series) < 1_000:
        return None
    if isinstance(series.dtype, pd.CategoricalDtype):
        categories = series.cat.categories
        if categories.dtype == object and pd.api.types.infer_dtype(categories, skipna=True) != "string":
            return None  # categories of mixed types: read value by value
        return series.cat.codes.to_numpy(), pd.Series(categories.to_numpy(dtype=object), dtype=object)
    if pd.api.types.infer_dtype(series, skipna=True) != "string":
        return None
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    return codes, pd.Series(np.asarray(uniques, dtype=object), dtype=object)


@dataclass(frozen=True)
class PerturbationReading:
    """Canonical conditions of every cell and what was found (for the printed note)."""

    conditions: np.ndarray  # canonical condition per cell; the control value for control cells
    is_control: np.ndarray
    missing: np.ndarray  # no value at all (NaN / blank): such cells are dropped from the task
    n_single: int  # distinct single-target conditions
    n_multi: int  # distinct combinations
    padded: int  # cells whose value had padding removed (``A+ctrl`` -> ``A``)
    control_labels: tuple[str, ...]  # raw values read as controls
    unsplit_separator: str | None  # a separator other than combo_sep that many conditions contain

    def note(self, column: str, sep: str, kind: str) -> str:
        """One line: how ``column`` was read."""
        n_control = int(self.is_control.sum())
        labels = ", ".join(repr(c) for c in self.control_labels) or "none"
        if kind == "chemical":
            n_cond = self.n_single + self.n_multi
            return (
                f"perturbation column {column!r} read as chemical: {n_cond} treatment{'s' if n_cond != 1 else ''}, "
                f"{n_control} control cells ({labels})"
            )
        text = (
            f"perturbation column {column!r} read with {sep!r} joining targets: {self.n_single} single and "
            f"{self.n_multi} combined perturbations, {n_control} control cells ({labels})"
        )
        if self.padded:
            text += f"; 'ctrl' padding removed from {self.padded} cells (GEARS style 'A+ctrl' -> 'A')"
        if self.unsplit_separator:
            text += (
                f"; values such as 'A{self.unsplit_separator}B' were read as ONE target: if "
                f"{self.unsplit_separator!r} joins two targets, pass --combo-sep '{self.unsplit_separator}'"
            )
        return text


def canonical_condition(value: str, control_value: str, sep: str, kind: str) -> str:
    """The canonical name of one raw condition (``control_value`` for a control)."""
    text = str(value).strip()
    if text == str(control_value):
        return str(control_value)
    if kind == "chemical":
        return text
    padding = {t.casefold() for t in PADDING_TOKENS} | {str(control_value).casefold()}
    targets = [t.strip() for t in text.split(sep)] if sep else [text]
    targets = [t for t in targets if t and t.casefold() not in padding]
    if not targets:
        return str(control_value)
    return "+".join(targets)


def read_perturbations(
    values: Iterable[object], control_value: str, sep: str = "+", kind: str = "genetic"
) -> PerturbationReading:
    """Canonical conditions of a perturbation column (see the module docstring)."""
    series = pd.Series(list(values), dtype=object)
    raw, missing = label_text(series)
    cache: dict[str, str] = {}
    out = np.empty(len(raw), dtype=object)
    padded = 0
    for i, value in enumerate(raw):
        if missing[i]:
            out[i] = ""
            continue
        if value not in cache:
            cache[value] = canonical_condition(value, control_value, sep, kind)
        out[i] = cache[value]
        if (
            kind == "genetic"
            and sep
            and any(t.strip().casefold() in PADDING_TOKENS for t in value.split(sep))
            and out[i] != str(control_value)
        ):
            padded += 1
    is_control = (out == str(control_value)) & ~missing
    control_labels = tuple(sorted({raw[i] for i in np.flatnonzero(is_control)}))
    conditions = {c for c, m, k in zip(out, missing, is_control, strict=True) if not m and not k}
    n_multi = sum("+" in c for c in conditions) if kind == "genetic" else 0
    unsplit = None
    if kind == "genetic" and conditions:
        counts = Counter(s for c in conditions for s in OTHER_SEPARATORS if s != sep and s in c)
        if counts:
            s, n = counts.most_common(1)[0]
            if n >= max(1, len(conditions) // 10):
                unsplit = s
    return PerturbationReading(
        conditions=out,
        is_control=is_control,
        missing=missing,
        n_single=len(conditions) - n_multi,
        n_multi=n_multi,
        padded=padded,
        control_labels=control_labels,
        unsplit_separator=unsplit,
    )
