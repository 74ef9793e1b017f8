"""Rewards by name, as open-r1 and TRL's scripts register them, so a recipe can list
``reward_funcs: [format, dual]`` with ``reward_weights``.

``REWARDS`` maps a name to its factory; every factory has one signature,
``factory(context: RewardContext, **params) -> reward``, and reads what it needs from the run's
:class:`~cellduality.rewards.context.RewardContext` (vocabularies, prepared data, the policy's
generation and readers, the seed). ``build_rewards`` makes the callables a trainer receives, the same
way for every name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cellduality.rewards.aligned import OracleEval
from cellduality.rewards.context import RewardContext
from cellduality.rewards.dual import DualReward
from cellduality.rewards.format import FormatReward
from cellduality.rewards.neighbourhood import NeighbourhoodFormat, NeighbourhoodGain, NeighbourhoodValidity
from cellduality.rewards.oracle import Oracle, OracleAccuracy, OracleRWJS
from cellduality.rewards.verifier import VERIFIERS

Reward = Callable[..., list[float | None]]
RewardFactory = Callable[..., Reward]

REWARDS: dict[str, RewardFactory] = {
    "format": FormatReward.from_context,
    "oracle": Oracle.from_context,
    "oracle_accuracy": OracleAccuracy.from_context,
    "oracle_rwjs": OracleRWJS.from_context,
    # the oracle that rewards what eval scores, from the RL pool's labels (the ablation's upper reference)
    "oracle_eval": OracleEval.from_context,
    "dual": DualReward.from_context,
    # knowledge-graph neighbourhood editing (cellduality.rewards.neighbourhood)
    "neighbourhood_format": NeighbourhoodFormat.from_context,
    "neighbourhood_validity": NeighbourhoodValidity.from_context,
    "neighbourhood_gain": NeighbourhoodGain.from_context,
    # PerturbCellRL-style single-cell verifiers (cellduality.rewards.verifier)
    **{name: cls.from_context for name, cls in VERIFIERS.items()},
}

# Rewards that read ground truth: never allowed in a self-supervised run, and the only rewards
# ``build_rewards`` hands the context's prepared data (``register_reward(..., uses_labels=True)`` adds one).
USES_LABELS: set[str] = {
    "oracle",
    "oracle_accuracy",
    "oracle_rwjs",
    "oracle_eval",
    # verifier rewards compare with observed perturbed cells
    *VERIFIERS,
    # the Pearson-delta gain compares edits with observed (training) deltas: a verifier-style label.
    # neighbourhood_format and neighbourhood_validity read only the prompt's lists: label-free.
    "neighbourhood_gain",
}


def register_reward(name: str, factory: RewardFactory, uses_labels: bool = False) -> None:
    """Add a reward under ``name``; ``factory(context, **params)`` like every other. ``uses_labels``:
    it reads ground truth (it then gets the context's prepared data, and self-supervised runs refuse it)."""
    if name in REWARDS:
        raise ValueError(f"a reward named {name!r} is already registered")
    REWARDS[name] = factory
    if uses_labels:
        USES_LABELS.add(name)


def build_rewards(
    names: Sequence[str],
    context: RewardContext,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Reward]:
    """The named rewards, each ``REWARDS[name](context, **params[name])``.

    A reward outside ``USES_LABELS`` is built from ``context.without_labels()``: labels reach only the
    rewards that declare them. ``weights`` (``reward_weights``), when given, must have one value per name.
    """
    from cellduality.data.schema import DataError  # a recipe mistake: one line, not a traceback

    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise KeyError(f"unknown reward(s) {unknown}; registered rewards: {', '.join(sorted(REWARDS))}")
    if weights is not None and len(weights) != len(names):
        raise DataError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs")
    params = params or {}
    label_free = context.without_labels()
    return [
        REWARDS[name](context if name in USES_LABELS else label_free, **params.get(name, {}))
        for name in names
    ]
