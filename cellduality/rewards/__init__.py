"""Rewards: format, dual (self-supervised), oracle and verifier (ground truth), neighbourhood, registry.

Every reward is built the same way, ``REWARDS[name](context, **params)``, from one
:class:`~cellduality.rewards.context.RewardContext` (``build_rewards``). Completion parsing and RWJS live
below both ``tasks`` and ``rewards`` (:mod:`cellduality.parsing`, :mod:`cellduality.rwjs`). The reward
classes import ``cellduality.tasks`` and are resolved lazily (PEP 562), so ``import cellduality.rewards``
stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "REWARDS": "registry",
    "USES_LABELS": "registry",
    "build_rewards": "registry",
    "register_reward": "registry",
    "RewardContext": "context",
    "DualReward": "dual",
    "FormatReward": "format",
    "NeighbourhoodFormat": "neighbourhood",
    "NeighbourhoodGain": "neighbourhood",
    "NeighbourhoodValidity": "neighbourhood",
    "Oracle": "oracle",
    "OracleAccuracy": "oracle",
    "OracleEval": "aligned",
    "OracleRWJS": "oracle",
    "VerifierReward": "verifier",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"cellduality.rewards.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cellduality.rewards' has no attribute {name!r}")
