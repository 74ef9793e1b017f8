"""Format reward: 1 for exactly ``<think>...</think><answer>...</answer>``, else 0.

Only the shape is checked; whether the answer is right is the other rewards' business. A strict 1/0
gives the policy an unambiguous target (as open-r1's format reward does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cellduality.parsing import parse_completion
from cellduality.rewards.base import RowReward, log_per_task, rows_from_columns


class FormatReward(RowReward):
    """Also logs ``format/<task>/parsed``: the share of completions whose answer is usable (a candidate
    label, a non-empty gene list), what the collapse guard (``cellduality.train.collapse``) watches."""

    name = "format"

    def score(self, row: Mapping[str, Any], completion: Any) -> float:
        return 1.0 if parse_completion(completion).well_formed else 0.0

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any):
        scores = super().__call__(prompts, completions, **columns)
        if columns.get("log_metric") is not None:
            from cellduality.tasks.dual import forward_answer

            rows = rows_from_columns(len(completions), columns)
            parsed = [
                None if r.get("task") is None else float(forward_answer(r, c, self.vocab_for(r)) is not None)
                for r, c in zip(rows, completions, strict=True)
            ]
            log_per_task(self.name, rows, parsed, columns["log_metric"], "parsed")
        return scores
