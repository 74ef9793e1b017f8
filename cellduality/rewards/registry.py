"""Rewards by name, as open-r1 and TRL's scripts register them, so a recipe can list
``reward_funcs: [format, dual]`` with ``reward_weights``.

``REWARDS`` maps a name to a factory taking keyword options (``vocabulary``, for ``dual`` the
``generate`` function, and for factories with ``needs_prepared`` the run's ``PreparedTasks``);
``build_rewards`` makes the callables a trainer receives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cellduality.rewards.aligned import OracleEval
from cellduality.rewards.base import RowReward
from cellduality.rewards.dual import DualReward
from cellduality.rewards.format import FormatReward
from cellduality.rewards.neighbourhood import NeighbourhoodFormat, NeighbourhoodGain, NeighbourhoodValidity
from cellduality.rewards.oracle import Oracle, OracleAccuracy, OracleRWJS

RewardFactory = Callable[..., Callable[..., list[float | None]]]

REWARDS: dict[str, RewardFactory] = {
    "format": FormatReward,
    "oracle": Oracle,
    "oracle_accuracy": OracleAccuracy,
    "oracle_rwjs": OracleRWJS,
    # the oracle that rewards what eval scores, from the RL pool's labels (the ablation's upper reference)
    "oracle_eval": OracleEval,
    "dual": DualReward,
    # knowledge-graph neighbourhood editing (cellduality.rewards.neighbourhood)
    "neighbourhood_format": NeighbourhoodFormat,
    "neighbourhood_validity": NeighbourhoodValidity,
    "neighbourhood_gain": NeighbourhoodGain,
}

# Rewards that read the ground-truth ``answer`` column: never allowed in a self-supervised run.
USES_LABELS = frozenset(
    {
        "oracle",
        "oracle_accuracy",
        "oracle_rwjs",
        "oracle_eval",
        # verifier rewards (cellduality.eval.verifier_rewards) compare with observed perturbed cells
        "verifier_pearson",
        "verifier_rmse",
        "verifier_spearman",
        "verifier_pathway",
        # the Pearson-delta gain compares edits with observed (training) deltas: a verifier-style label.
        # neighbourhood_format and neighbourhood_validity read only the prompt's lists: label-free.
        "neighbourhood_gain",
    }
)


def register_reward(name: str, factory: RewardFactory) -> None:
    """Add a reward under ``name`` (for example a verifier reward from ``cellduality.eval``)."""
    if name in REWARDS:
        raise ValueError(f"a reward named {name!r} is already registered")
    REWARDS[name] = factory


def build_rewards(
    names: Sequence[str],
    vocabulary: Mapping[str, str] | None = None,
    vocabularies: Mapping[str, Mapping[str, str]] | None = None,
    **options: Any,
) -> list[Callable[..., list[float | None]]]:
    """Instantiate the named rewards; ``options`` go to the factories that accept them. ``vocabularies``:
    each dataset's own genes, what a row of that dataset is parsed with (``RowReward.vocab_for``)."""
    out = []
    for name in names:
        if name not in REWARDS:
            raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARDS))}")
        factory = REWARDS[name]
        kwargs: dict[str, Any] = {"vocabulary": vocabulary}
        if factory is DualReward:
            kwargs.update(
                {
                    k: v
                    for k, v in options.items()
                    if k in ("generate", "num_samples", "seed", "deterministic")
                }
            )
        if getattr(factory, "needs_prepared", False) and "prepared" in options:
            kwargs["prepared"] = options["prepared"]
        reward = factory(**kwargs)
        if vocabularies and isinstance(reward, RowReward):
            reward.vocabularies = {k: dict(v) for k, v in vocabularies.items()}
        out.append(reward)
    return out
