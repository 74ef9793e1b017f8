"""The shape every reward shares: TRL's signature, per-row columns, ``None`` for rows not scored.

TRL calls ``reward(prompts=..., completions=..., completion_ids=..., **columns)`` with one list entry
per completion, the dataset's columns included. ``RowReward`` turns those column lists back into one
dict per row, so each reward is written as a function of a single row. It also keeps the gene
vocabulary (case-folded symbol -> symbol) that the contract's gene cleaning needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cellduality.tasks.common import RECORD_COLUMNS

if TYPE_CHECKING:
    from cellduality.rewards.context import RewardContext

R = TypeVar("R", bound="RowReward")


def rows_from_columns(n: int, columns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per completion from TRL's column lists (non-list keyword arguments are skipped)."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in columns.items():
        if key not in RECORD_COLUMNS or not isinstance(values, Sequence) or isinstance(values, str):
            continue
        if len(values) != n:
            continue
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return rows


class RowReward:
    """Base class: subclasses implement ``score(row, completion) -> float | None``."""

    name = "reward"

    def __init__(self, vocabulary: Mapping[str, str] | None = None) -> None:
        self.vocabulary = dict(vocabulary) if vocabulary is not None else None
        self.__name__ = self.name  # TRL logs rewards under the function's __name__

    #: per dataset, its own gene vocabulary (``RewardContext.vocabularies``): a run on several
    #: datasets has the union in ``vocabulary``, and an answer naming another dataset's genes must not
    #: count as a cell of this one (eval parses with the row's dataset's genes too)
    vocabularies: Mapping[str, Mapping[str, str]] | None = None

    @classmethod
    def from_context(cls: type[R], context: RewardContext, **params: Any) -> R:
        """The registry's factory, the one signature of every reward (``factory(context, **params)``):
        the run's vocabularies from the context, ``params`` to the constructor. A reward that reads more
        of the context (the policy, the prepared data) overrides it."""
        return cls(vocabulary=context.vocabulary, **params).with_vocabularies(context)

    def with_vocabularies(self: R, context: RewardContext) -> R:
        """Take each dataset's own vocabulary from ``context`` (returns ``self``)."""
        if context.vocabularies:
            self.vocabularies = {k: dict(v) for k, v in context.vocabularies.items()}
        return self

    def vocab_for(self, row: Mapping[str, Any]) -> Mapping[str, str] | None:
        """The gene vocabulary a row's answers are parsed with: its dataset's, else the run's union."""
        if self.vocabularies:
            found = self.vocabularies.get(str(row.get("dataset", "")))
            if found is not None:
                return found
        return self.vocabulary

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any):
        rows = rows_from_columns(len(completions), columns)
        scores = [self.score(row, completion) for row, completion in zip(rows, completions, strict=True)]
        log_per_task(self.name, rows, scores, columns.get("log_metric"))
        log_zero_std(self.name, rows, scores, columns.get("log_metric"))
        return scores


def log_per_task(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    scores: Sequence[float | None],
    log_metric: Callable[[str, float], None] | None,
    suffix: str = "mean",
) -> None:
    """Report the mean score of each task present in the batch as ``{name}/{task}/{suffix}``.

    TRL averages these over ranks (and over the calls of a logging step); a task absent from this rank's
    batch is simply not reported by it.
    """
    if log_metric is None:
        return
    by_task: dict[str, list[float]] = {}
    for row, value in zip(rows, scores, strict=True):
        if value is not None and row.get("task"):
            by_task.setdefault(str(row["task"]), []).append(float(value))
    for task, values in sorted(by_task.items()):
        log_metric(f"{name}/{task}/{suffix}", sum(values) / len(values))


def log_zero_std(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    scores: Sequence[float | None],
    log_metric: Callable[[str, float], None] | None,
) -> None:
    """Per task, the share of this batch's prompt groups (the completions of one row ``id``) whose scores
    are all equal, as ``{name}/{task}/zero_std``: such a group has no advantage, so it teaches nothing.

    TRL logs ``frac_reward_zero_std`` for the weighted sum over all tasks; this says which task's
    groups are the silent ones. Computed on this rank's completions.
    """
    if log_metric is None:
        return
    groups: dict[tuple[str, str], list[float]] = {}
    for row, value in zip(rows, scores, strict=True):
        if value is not None and row.get("task") and row.get("id") is not None:
            groups.setdefault((str(row["task"]), str(row["id"])), []).append(float(value))
    by_task: dict[str, list[bool]] = {}
    for (task, _), values in groups.items():
        if len(values) > 1:
            by_task.setdefault(task, []).append(max(values) - min(values) < 1e-12)
    for task, flags in sorted(by_task.items()):
        log_metric(f"{name}/{task}/zero_std", sum(flags) / len(flags))
