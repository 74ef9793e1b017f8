"""Rewards: completion parsing, RWJS, format, dual (self-supervised), oracle (ground truth), registry.

Parsing and RWJS live below both ``tasks`` and ``rewards`` (:mod:`cellduality.parsing`,
:mod:`cellduality.rwjs`); the reward classes import ``cellduality.tasks`` and are resolved lazily (PEP 562),
so ``import cellduality.rewards`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# rwjs and parsing import nothing from cellduality: safe eagerly, and the function
# ``rwjs`` shadows the submodule of the same name.
from cellduality.parsing import parse_completion as parse_completion
from cellduality.parsing import parse_genes as parse_genes
from cellduality.parsing import parse_label as parse_label
from cellduality.rwjs import rwjs as rwjs

_EXPORTS = {
    "REWARDS": "registry",
    "USES_LABELS": "registry",
    "build_rewards": "registry",
    "register_reward": "registry",
    "DualReward": "dual",
    "FormatReward": "format",
    "NeighbourhoodFormat": "neighbourhood",
    "NeighbourhoodGain": "neighbourhood",
    "NeighbourhoodValidity": "neighbourhood",
    "Oracle": "oracle",
    "OracleAccuracy": "oracle",
    "OracleEval": "aligned",
    "OracleRWJS": "oracle",
}

__all__ = sorted([*_EXPORTS, "parse_completion", "parse_genes", "parse_label", "rwjs"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"cellduality.rewards.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cellduality.rewards' has no attribute {name!r}")
