"""RWJS against hand-computed values (the contract in docs/contracts.md)."""

from __future__ import annotations

import pytest

from cellduality.rwjs import rwjs


def test_design_example() -> None:
    # a = [A, B, C], b = [B, A, D]; min: A 1/2, B 1/2 -> 1; max: A 1, B 1, C 1/3, D 1/3 -> 8/3
    assert rwjs(["A", "B", "C"], ["B", "A", "D"]) == pytest.approx(0.375)


def test_identical_disjoint_empty() -> None:
    assert rwjs(["A", "B", "C"], ["A", "B", "C"]) == pytest.approx(1.0)
    assert rwjs(["A", "B"], ["C", "D"]) == 0.0
    assert rwjs(["A", "B"], []) == 0.0
    assert rwjs([], ["A"]) == 0.0


def test_prefix_and_order_matter() -> None:
    # a = [A, B], b = [A]: min A 1; max A 1, B 1/2 -> 1 / 1.5
    assert rwjs(["A", "B"], ["A"]) == pytest.approx(2 / 3)
    # a = [A, B, C, D], b = [D, C, B, A]: min: A 1/4, B 1/3, C 1/3, D 1/4 = 7/6; max: 1 + 1/2 + 1/2 + 1 = 3
    assert rwjs(list("ABCD"), list("DCBA")) == pytest.approx((7 / 6) / 3)


def test_duplicates_keep_first_rank() -> None:
    # b = [A, A, B] counts as [A, B]
    assert rwjs(["A", "B"], ["A", "A", "B"]) == pytest.approx(1.0)


def test_symmetric_in_value_not_in_meaning() -> None:
    a, b = ["A", "B", "C"], ["C", "A"]
    assert rwjs(a, b) == pytest.approx(rwjs(b, a))
