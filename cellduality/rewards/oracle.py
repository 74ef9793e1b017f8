"""Oracle rewards: ground truth instead of the dual task, for the ablation the paper reports.

Classification rows score 1 when the parsed label equals ``answer``; generation rows score
RWJS(ground-truth cell, generated cell). Each reward returns ``None`` for rows it does not score.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cellduality.parsing import match_label, parse_genes, parse_label
from cellduality.rewards.base import RowReward
from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS, rwjs_casefold


class OracleAccuracy(RowReward):
    name = "oracle_accuracy"

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") not in CLASSIFICATION_TASKS:
            return None
        label = parse_label(completion, row.get("candidates") or [])
        return 1.0 if label is not None and match_label(label, [row.get("answer", "")]) else 0.0


class OracleRWJS(RowReward):
    name = "oracle_rwjs"

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") not in GENERATION_TASKS:
            return None
        reference = str(row.get("answer", "")).split()
        limit = int(row.get("n_genes") or 0) or len(reference) or None
        return rwjs_casefold(reference, parse_genes(completion, self.vocab_for(row), limit))


class Oracle(RowReward):
    """Accuracy on classification rows and RWJS on generation rows, in one reward."""

    name = "oracle"

    def __init__(self, vocabulary: Mapping[str, str] | None = None) -> None:
        super().__init__(vocabulary)
        self._parts = (OracleAccuracy(vocabulary), OracleRWJS(vocabulary))

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        for part in self._parts:
            value = part.score(row, completion)
            if value is not None:
                return value
        return None
