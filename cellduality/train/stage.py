"""What ``cellduality.train.sft`` and ``.grpo`` share as entry points: help, launch check, one-line errors.

:func:`stage_main` runs a training stage: ``--help`` built from CellDuality's own argument dataclasses
(with defaults, without importing TRL, so it answers at once), ``--help-all`` with TRL's full list, the
launch guard, then the stage's ``run``; a user's mistake (an unknown recipe field, bad data, a refused
launch set-up) is one line and exit status 2. The ``cellduality sft`` / ``grpo`` subcommands
(:mod:`cellduality.train.command`) and ``python -m cellduality.train.sft`` / ``.grpo`` both end here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence

from cellduality.cli_common import HelpFormatter

STAGES = {
    "sft": {
        "help": "supervised fine-tuning on teacher traces (TRL SFTTrainer); --help lists the recipe fields",
        "description": (
            "Supervised fine-tuning of a causal LM on teacher-distilled <think>/<answer> traces (forward and "
            "dual examples) with TRL's SFTTrainer. The recipe YAML (--config) sets every field; any field "
            "can be overridden as --field value. Without sft_data the examples are made with the offline "
            "teacher. Killed? Run the same command again: it resumes from the newest complete checkpoint."
        ),
        "example": "cellduality sft --config recipes/tiny-cpu/sft.yaml --num_train_epochs 1",
        "trl": "SFTConfig",
    },
    "grpo": {
        "help": "dual-task GRPO (self-supervised) or its oracle ablation (TRL GRPOTrainer)",
        "description": (
            "GRPO with CellDuality's rewards: format + dual (no labels) or oracle (ground truth), with TRL's "
            "GRPOTrainer. The recipe YAML (--config) sets every field; any field can be overridden as "
            "--field value. Start from the SFT checkpoint with --model_name_or_path. Killed? Run the same "
            "command again: it resumes from the newest complete checkpoint."
        ),
        "example": (
            "cellduality grpo --config recipes/tiny-cpu/grpo_dual.yaml --model_name_or_path outputs/tiny-cpu/sft"
        ),
        "trl": "GRPOConfig",
    },
}

#: TRL fields users override most; listed in the short help (their defaults: --help-all or the recipe).
COMMON_TRL_FIELDS = (
    ("output_dir", "where checkpoints, the final model and cellduality_run.json go"),
    ("model_name_or_path", "the model to train: a folder (the SFT checkpoint for GRPO) or a hub id"),
    ("max_steps", "optimizer steps (overrides num_train_epochs when > 0)"),
    ("num_train_epochs", "passes over the training examples"),
    ("learning_rate", "peak learning rate"),
    ("per_device_train_batch_size", "examples per device and step"),
    ("save_steps", "steps between checkpoints (with save_strategy: steps)"),
    ("resume_from_checkpoint", "a checkpoint-N folder (default: the newest complete one in output_dir)"),
    ("use_peft", "train a LoRA adapter (with lora_r, lora_alpha, lora_target_modules)"),
    ("seed", "everything that is random"),
)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def stage_parser(stage: str) -> argparse.ArgumentParser:
    """A parser used for the help text only (TRL's parser does the real parsing)."""
    from cellduality.train.configs import CellDualityArguments, SFTDataArguments

    info = STAGES[stage]
    p = argparse.ArgumentParser(
        prog=f"cellduality {stage}",
        usage=f"cellduality {stage} [--config RECIPE.yaml] [--FIELD VALUE ...]",
        description=info["description"],
        epilog=(
            f"example:\n  {info['example']}\n\nAlso: python -m cellduality.train.{stage} (same flags), and "
            f"accelerate launch [--config_file accelerate_configs/zero3.yaml] -m cellduality.train.{stage} ..."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", metavar="RECIPE.yaml", help="the recipe: a YAML file of fields (recipes/)")
    p.add_argument(
        "--help-all",
        action="store_true",
        help=f"every field of TRL's {info['trl']} and ModelConfig with TRL's defaults (imports TRL: slow)",
    )
    groups = [("CellDuality fields (in the recipe, or --field value)", CellDualityArguments)]
    if stage == "sft":
        groups.append(("SFT data fields", SFTDataArguments))
    for title, cls in groups:
        g = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            default = _default(f)
            if isinstance(default, bool):
                default = str(default).lower()
            g.add_argument(f"--{f.name}", default=default, metavar="", help=f.metadata.get("help", ""))
    g = p.add_argument_group(f"TRL fields most often overridden ({info['trl']}, ModelConfig; see --help-all)")
    for name, text in COMMON_TRL_FIELDS:
        g.add_argument(f"--{name}", metavar="", help=text)
    return p


def stage_help(stage: str) -> str:
    return stage_parser(stage).format_help()


def wants_help(argv: Sequence[str]) -> str | None:
    """``'short'`` for -h/--help, ``'all'`` for --help-all, else ``None``."""
    if "--help-all" in argv:
        return "all"
    if "-h" in argv or "--help" in argv:
        return "short"
    return None


def stage_main(stage: str, argv: Sequence[str] | None, prog: str, parse_args, run) -> int:
    """The entry point of ``python -m cellduality.train.<stage>`` and ``cellduality <stage>``.

    Help without importing TRL, the launch guard, then ``run(*parse_args(argv))``; a user's mistake (bad
    data, a refused folder, a refused launch set-up) is one line on the first rank and exit status 2.
    """
    from cellduality.data.schema import DataError
    from cellduality.modeling.tiny import TinyModelRefused
    from cellduality.train.launch_guard import (
        LaunchError,
        check_launch_environment,
        skip_deepspeed_cpu_shm_kernel,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    kind = wants_help(args)
    if kind == "short":
        print(stage_help(stage))
        return 0
    if kind == "all":
        return print_full_help(parse_args)
    try:
        environment = check_launch_environment()
    except LaunchError as exc:  # every rank refuses; the first one says why
        return report_error(prog, exc)
    skip_deepspeed_cpu_shm_kernel(environment)
    if args and not args[0].startswith("-"):  # `cellduality grpo recipe.yaml`: TRL would ignore it until late
        hint = f" (a recipe: --config {args[0]})" if args[0].endswith((".yaml", ".yml")) else ""
        return report_error(
            prog, RecipeError(f"unexpected argument {args[0]!r}{hint}; fields are --field value")
        )
    try:
        parsed = parse_args(args)
    except (OSError, ValueError) as exc:  # an unknown field, an unreadable recipe, a value TRL refuses
        return report_error(prog, RecipeError(recipe_error_message(stage, args, exc)))
    from cellduality.teacher.pipeline import TeacherUnavailableError

    try:
        run(*parsed)
    except (DataError, TinyModelRefused, LaunchError, TeacherUnavailableError) as exc:
        return report_error(prog, exc)
    return 0


class RecipeError(ValueError):
    """A recipe or override that cannot be parsed: an unknown field, a missing file, a refused value."""


#: TRL's messages for names it does not know, on the command line and in the YAML (TRL 1.x, transformers 4/5)
_UNKNOWN = re.compile(
    r"^(?:Some specified arguments are not used by the HfArgumentParser|Unknown arguments from config file): "
    r"(\[.*?\])",
    re.S,
)


def recipe_field_names(stage: str) -> list[str]:
    """Every field a ``stage`` recipe may set: ours, TRL's ``SFTConfig`` / ``GRPOConfig`` and ``ModelConfig``."""
    from trl import GRPOConfig, ModelConfig, SFTConfig

    from cellduality.train.configs import CellDualityArguments, SFTDataArguments

    types = (
        (CellDualityArguments, SFTDataArguments, SFTConfig, ModelConfig)
        if stage == "sft"
        else (CellDualityArguments, GRPOConfig, ModelConfig)
    )
    return sorted({f.name for cls in types for f in dataclasses.fields(cls) if f.init})


def recipe_error_message(stage: str, argv: Sequence[str], exc: BaseException) -> str:
    """One line for a recipe TRL's parser refused: the unknown field(s) and the closest known name.

    Why not TRL's message: it is a traceback that names ``HfArgumentParser`` and lists the leftover
    strings (values included), and says nothing about what the user meant; a mistyped
    ``--learnin_rate`` should read "unknown field learnin_rate (did you mean learning_rate?)".
    """
    import ast
    import difflib

    recipe = ""
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        recipe = argv[argv.index("--config") + 1]
    if isinstance(exc, OSError):
        return f"cannot read the recipe {exc.filename or recipe}: {exc.strerror or exc}"
    text = str(exc)
    match = _UNKNOWN.match(text)
    if match is None:  # a value TRL's config refuses (its own one-line reason), or bad YAML
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return first + (f" (recipe {recipe})" if recipe else "")
    try:
        leftover = [str(item) for item in ast.literal_eval(match.group(1))]
    except (ValueError, SyntaxError):
        leftover = []
    from_yaml = text.startswith("Unknown arguments from config file")
    names = [item[2:].split("=", 1)[0] for item in leftover if item.startswith("--")]
    known = recipe_field_names(stage)
    parts = []
    for name in names:
        close = difflib.get_close_matches(name.replace("-", "_"), known, n=1, cutoff=0.6)
        parts.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    where = f"in the recipe {recipe}" if from_yaml else "on the command line"
    if not names:
        stray = " ".join(leftover) or text
        return f"unexpected argument(s) {stray} {where}: fields are given as --field value (a recipe as --config FILE)"
    return (
        f"unknown field{'s' if len(names) > 1 else ''} {where}: {', '.join(parts)}; "
        f"`cellduality {stage} --help` lists the fields"
    )


def print_full_help(parse_args) -> int:
    """TRL's own help (``--help-all``)."""
    try:
        parse_args(["--help"])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def rank_zero() -> bool:
    """Whether this process is the first (or only) rank of a launch."""
    return os.environ.get("RANK", "0") in ("", "0") and os.environ.get("LOCAL_RANK", "0") in ("", "0")


def report_error(prog: str, exc: BaseException, other_ranks_wait_s: float = 5.0) -> int:
    """One line on stderr (first rank only, so a launch prints it once); exit status 2.

    The other ranks wait a moment before exiting: torchrun stops every rank as soon as one fails, and
    the first rank must have said why by then.
    """
    if rank_zero():
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    elif os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        import time

        time.sleep(other_ranks_wait_s)
    return 2
