"""Training entry points (``accelerate launch -m cellduality.train.sft`` / ``.grpo``) and their launch checks.

Importing this package is light on purpose: the entry points import torch, TRL and transformers
themselves, after :func:`cellduality.train.launch_guard.check_launch_environment` has run.
"""

from __future__ import annotations

from cellduality.train.launch_guard import (
    LaunchEnvironment,
    LaunchError,
    check_launch_environment,
    validate_accelerate_config,
)

__all__ = ["LaunchEnvironment", "LaunchError", "check_launch_environment", "validate_accelerate_config"]
