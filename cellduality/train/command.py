"""``cellduality sft`` and ``cellduality grpo``: the training entry points as subcommands.

``cellduality sft --config recipes/tiny-cpu/sft.yaml [--field value ...]`` runs exactly what
``python -m cellduality.train.sft`` runs (TRL's ``TrlParser`` reads the recipe and the overrides). Their
``--help`` is built by :mod:`cellduality.train.stage` from CellDuality's own argument dataclasses, with
defaults and without importing TRL, so it answers at once; ``--help-all`` prints TRL's full list (every
``SFTConfig`` / ``GRPOConfig`` and ``ModelConfig`` field with TRL's defaults), which takes a few seconds.
Multi-GPU runs keep using ``accelerate launch -m cellduality.train.sft`` (docs/recipes.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cellduality.train.stage import STAGES, stage_help, wants_help


def run_stage(stage: str, argv: Sequence[str]) -> int:
    """``cellduality sft|grpo ARGV``: the help, or the training entry point's ``main``."""
    argv = list(argv)
    kind = wants_help(argv)
    if kind == "short":
        print(stage_help(stage))
        return 0
    if stage == "sft":
        from cellduality.train.sft import main
    else:
        from cellduality.train.grpo import main
    return main(argv, prog=f"cellduality {stage}")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """List ``sft`` and ``grpo`` in ``cellduality --help``; their arguments go to TRL (see ``run_stage``)."""
    for stage, info in STAGES.items():
        subparsers.add_parser(stage, help=info["help"], add_help=False)
