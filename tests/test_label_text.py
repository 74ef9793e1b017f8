"""Label columns read per distinct value give what reading every value gives (``label_text``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellduality.data.perturbations import MISSING_MARKERS, label_text, missing_mask

VALUES = np.array([" a", "b ", "NaN", "", "none", "x", " N/A ", "<NA>", "c", "B cell"], dtype=object)


def _reference(series: pd.Series) -> tuple[list[str], list[bool]]:
    """Value by value, in plain Python: ``str(v).strip()``, and missing when NaN/None or a marker."""
    text, missing = [], []
    for value in series.astype(object).tolist():
        gone = bool(pd.isna(value)) or str(value).strip().casefold() in MISSING_MARKERS
        missing.append(gone)
        text.append("" if gone else str(value).strip())
    return text, missing


def _columns() -> dict[str, pd.Series]:
    rng = np.random.default_rng(0)
    n = 5_000
    pick = VALUES[rng.integers(0, VALUES.size, n)]
    holes = rng.random(n) < 0.1
    return {
        "strings": pd.Series(pick, dtype=object),
        "categorical": pd.Series(pd.Categorical(pick)),
        "strings with None": pd.Series(np.where(holes, None, pick), dtype=object),
        "strings with NaN": pd.Series(np.where(holes, np.nan, pick), dtype=object),
        "categorical with NaN": pd.Series(pd.Categorical(np.where(holes, None, pick))),
        "string dtype": pd.Series(np.where(holes, None, pick), dtype="string"),
        # equal values read differently (1, 1.0, True): value by value
        "mixed types": pd.Series([1, 1.0, True, " a ", None, float("nan"), "nan"] * 800, dtype=object),
        "categorical of ints": pd.Series(pd.Categorical(rng.integers(0, 5, n))),
        "floats with NaN": pd.Series(np.where(holes, np.nan, rng.integers(0, 5, n))),
        "all distinct": pd.Series([f" cell{i} " for i in range(n)], dtype=object),
        "few rows": pd.Series(pick[:50], dtype=object),
    }


@pytest.mark.parametrize("name", list(_columns()))
def test_label_text_equals_reading_every_value(name: str) -> None:
    series = _columns()[name]
    text, missing = label_text(series)
    want_text, want_missing = _reference(series)
    assert text.dtype == object and missing.dtype == bool
    assert text.tolist() == want_text
    assert missing.tolist() == want_missing
    assert missing_mask(series).tolist() == want_missing
    assert missing.any() or name in {"categorical of ints", "all distinct"}


def test_label_text_keeps_positions_of_an_indexed_series() -> None:
    series = pd.Series(pd.Categorical(["b", " a", None] * 500), index=[f"c{i}" for i in range(1500)])
    text, missing = label_text(series.iloc[::-1])
    assert text[:3].tolist() == ["", "a", "b"] and missing[:3].tolist() == [True, False, False]
