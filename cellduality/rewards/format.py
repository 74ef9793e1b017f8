"""Format reward: 1 for exactly ``<think>...</think><answer>...</answer>``, else 0.

Only the shape is checked; whether the answer is right is the other rewards' business. A strict 1/0
gives the policy an unambiguous target (as open-r1's format reward does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cellduality.parsing import parse_completion
from cellduality.rewards.base import RowReward


class FormatReward(RowReward):
    name = "format"

    def score(self, row: Mapping[str, Any], completion: Any) -> float:
        return 1.0 if parse_completion(completion).well_formed else 0.0
