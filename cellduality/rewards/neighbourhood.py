"""Rewards of the neighbourhood-editing task: format, validity and the Pearson-delta gain.

All three return ``None`` for rows of other tasks. The edit is parsed by
:func:`cellduality.tasks.neighbourhood.parse_edit` and checked against the row's ``neighbours``
(what may be removed) and ``candidates`` (what may be added).

* ``neighbourhood_format``: 1 when the completion is exactly ``<think>…</think><answer>…</answer>``
  and the answer is made of ``add:`` / ``remove:`` clauses only (each at most once), else 0.
* ``neighbourhood_validity``: the share of proposed items that are valid (additions among the
  candidates, removals among the current neighbours), in [0, 1]; an **empty edit** (nothing added or
  removed) gets :data:`EMPTY_EDIT_PENALTY` (-0.5), and an answer with no add/remove clause
  :data:`NO_EDIT_SCORE` (-1). So any real attempt at an edit scores above doing nothing, which scores
  above not answering. Reads no label: usable in a self-supervised run.
* ``neighbourhood_gain``: ``clip((r_edited - r_unedited) / GAIN_SCALE, -GAIN_CLIP, GAIN_CLIP)``, where
  ``r`` is the Pearson correlation of a set's mean training delta with the target's observed
  **training** delta (``cellduality.tasks.neighbourhood.edit_gain``; invalid items are ignored, an
  empty final set predicts the mean of all training perturbations). Rows whose target has no training
  delta (held-out targets) get ``None``. The gains of real edits are a few hundredths of a correlation
  and the target's training delta is itself noisy: dividing by 0.1 puts a clearly better neighbourhood
  on the scale of the format and validity rewards, and clipping at 1 keeps a few large, mostly noisy
  gains (targets with few cells) from dominating a group's advantages.

The gain reads observed deltas, i.e. ground truth of the training perturbations, so it is in
``USES_LABELS``: ``reward_mode: self_supervised`` refuses it (use ``oracle`` or ``combined``). It never
reads held-out data: its table holds training perturbations only, built from training cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cellduality.parsing import parse_completion
from cellduality.rewards.base import RowReward, log_per_task, rows_from_columns
from cellduality.rewards.context import RewardContext
from cellduality.tasks.neighbourhood import TASK, DeltaTable, edit_gain, parse_edit, resolve_edit

EMPTY_EDIT_PENALTY = -0.5
NO_EDIT_SCORE = -1.0
GAIN_SCALE = 0.1
GAIN_CLIP = 1.0


class NeighbourhoodFormat(RowReward):
    name = "neighbourhood_format"

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") != TASK:
            return None
        edit = parse_edit(completion)
        return (
            1.0 if parse_completion(completion).well_formed and edit is not None and edit.well_formed else 0.0
        )


def validity_score(
    row: Mapping[str, Any], completion: Any, empty_penalty: float = EMPTY_EDIT_PENALTY
) -> float:
    """The validity reward of one completion (see the module docstring)."""
    edit = parse_edit(completion)
    if edit is None:
        return NO_EDIT_SCORE
    if edit.empty:
        return empty_penalty
    resolved = resolve_edit(edit, row.get("neighbours") or [], row.get("candidates") or [])
    return float(resolved.valid_fraction)


class NeighbourhoodValidity(RowReward):
    name = "neighbourhood_validity"

    def __init__(
        self, vocabulary: Mapping[str, str] | None = None, empty_penalty: float = EMPTY_EDIT_PENALTY
    ):
        super().__init__(vocabulary)
        self.empty_penalty = empty_penalty

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") != TASK:
            return None
        return validity_score(row, completion, self.empty_penalty)

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any):
        scores = super().__call__(prompts, completions, **columns)
        rows = rows_from_columns(len(completions), columns)
        empty = [
            (1.0 if (e := parse_edit(c)) is not None and e.empty else 0.0)
            if row.get("task") == TASK
            else None
            for row, c in zip(rows, completions, strict=True)
        ]
        log_per_task(self.name, rows, empty, columns.get("log_metric"), "empty_edit_rate")
        return scores


class NeighbourhoodGain(RowReward):
    """The scaled, clipped Pearson-delta gain of the edit over the unedited neighbourhood."""

    name = "neighbourhood_gain"

    def __init__(
        self,
        table: DeltaTable | None,
        vocabulary: Mapping[str, str] | None = None,
        scale: float = GAIN_SCALE,
        clip: float = GAIN_CLIP,
    ) -> None:
        super().__init__(vocabulary)
        if scale <= 0 or clip <= 0:
            raise ValueError("scale and clip must be positive")
        if table is None:
            raise ValueError(
                "neighbourhood_gain needs the mean training deltas of a prepared neighbourhood task "
                "(`cellduality prepare --tasks neighbourhood --split ood`): train through cellduality.train "
                "(whose reward context holds them) or give NeighbourhoodGain(table)"
            )
        self.table = table
        self.scale = scale
        self.clip = clip
        self.last_gains: list[float | None] = []

    @classmethod
    def from_context(
        cls, context: RewardContext, scale: float = GAIN_SCALE, clip: float = GAIN_CLIP
    ) -> NeighbourhoodGain:
        """The delta table of the context's prepared data (its ``neighbourhood_deltas`` side table)."""
        table = DeltaTable.from_prepared(context.require_prepared(cls.name))
        return cls(table, context.vocabulary, scale, clip).with_vocabularies(context)

    def gain(self, row: Mapping[str, Any], completion: Any) -> float | None:
        """The raw (unscaled) gain; ``None`` when the row's target has no training delta."""
        if row.get("task") != TASK:
            return None
        deltas = self.table.get(str(row.get("dataset", "")), str(row.get("context") or ""))
        target = str(row.get("condition", ""))
        own = deltas.delta(target) if deltas is not None else None
        if own is None:
            return None
        neighbours = list(row.get("neighbours") or [])
        resolved = resolve_edit(parse_edit(completion), neighbours, row.get("candidates") or [])
        return edit_gain(resolved.final, neighbours, target, own, deltas)

    def scaled(self, gain: float | None) -> float | None:
        if gain is None:
            return None
        if not math.isfinite(gain):
            return 0.0
        return float(min(self.clip, max(-self.clip, gain / self.scale)))

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        return self.scaled(self.gain(row, completion))

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any):
        rows = rows_from_columns(len(completions), columns)
        self.last_gains = [self.gain(row, c) for row, c in zip(rows, completions, strict=True)]
        scores = [self.scaled(g) for g in self.last_gains]
        log_metric = columns.get("log_metric")
        log_per_task(self.name, rows, scores, log_metric)
        log_per_task(self.name, rows, self.last_gains, log_metric, "pearson_gain")
        return scores


__all__ = [
    "EMPTY_EDIT_PENALTY",
    "GAIN_CLIP",
    "GAIN_SCALE",
    "NO_EDIT_SCORE",
    "NeighbourhoodFormat",
    "NeighbourhoodGain",
    "NeighbourhoodValidity",
    "validity_score",
]
