"""The stages the demo and the ablation run, each from its recipe: prepare -> sft -> grpo -> eval -> dual-check.

One public function per stage (:func:`prepare`, :func:`sft`, :func:`grpo`, :func:`evaluate`,
:func:`dual_check`); ``cellduality demo`` and ``cellduality ablation`` are orders of these calls. Their
sizes and settings are not in Python: a *plan* is a folder of recipes, one YAML file per stage
(``prepare.yaml``, ``sft.yaml``, ``grpo_dual.yaml``, ``grpo_oracle.yaml``, ``eval.yaml``,
``dual_check.yaml``). The packaged plans are ``cellduality/recipes/demo/{full,quick}`` and
``cellduality/recipes/ablation/{full,tiny}``; in the repository ``recipes/demo`` and ``recipes/ablation``
link to them. They live inside the package so that ``cellduality demo`` finds them from any folder and
after a plain ``pip install`` (package data), where a repository's ``recipes/`` does not exist.

Every recipe is read by TRL's ``TrlParser``, the parser of ``cellduality sft --config``. The SFT and GRPO
recipes are ``cellduality sft`` / ``grpo`` recipes read by those commands' own ``parse_args``: a stage runs
what ``cellduality sft --config <plan>/sft.yaml --output_dir <out>/sft --dataset <folders> --seed N ...``
runs, the run's folders and seed given after the recipe as ``--field value``, as a user gives them. The
other three recipes hold the flags of ``cellduality prepare``, ``eval`` and ``dual-check`` of the same
names (the dataclasses below). There is no separate sft-data stage: the SFT stage makes its examples with
the offline teacher when its ``sft_data`` folder is empty, as ``cellduality sft`` does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellduality.data.schema import DataError

#: the packaged plans: ``demo/full``, ``demo/quick``, ``ablation/full``, ``ablation/tiny``
RECIPES = Path(__file__).resolve().parent / "recipes"
#: the recipe files a plan may hold, in the order the stages run
STAGES = ("prepare", "sft", "grpo_dual", "grpo_oracle", "eval", "dual_check")


@dataclass
class PrepareArguments:
    """The prepare recipe's own fields; the others are :class:`cellduality.tasks.TaskConfig`'s."""

    datasets: list[str] = field(
        default_factory=lambda: ["pbmc68k"],
        metadata={"help": "embedded dataset names, one prepared folder each (out/prepared/<name>)"},
    )
    split: str = field(default="id", metadata={"help": "id or ood, for every dataset (`prepare --split`)"})


@dataclass
class EvalArguments:
    """The eval recipe: the ``cellduality eval`` flags of the same names (and their defaults)."""

    max_examples: int | None = field(
        default=None, metadata={"help": "test examples per task (seeded sample); null: all of them"}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "longest completion"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})
    backend: str = field(default="auto", metadata={"help": "hf, vllm, or auto"})
    sampled: bool = field(
        default=False,
        metadata={
            "help": "the ablation: also score answers sampled at T = 1 (GRPO's own temperature, seeded); "
            "the demo scores greedy answers only"
        },
    )


@dataclass
class DualCheckArguments:
    """The dual-check recipe: the ``cellduality dual-check`` flags of the same names (and their defaults)."""

    max_rows: int = field(default=60, metadata={"help": "examples per task and split (seeded sample)"})
    group_size: int = field(default=4, metadata={"help": "G, sampled forward answers per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the forward answers"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per forward or dual answer"})
    batch_size: int = field(default=32, metadata={"help": "prompts per generation batch"})
    backend: str = field(default="hf", metadata={"help": "hf, vllm, or auto"})


@dataclass(frozen=True)
class Plan:
    """A folder of stage recipes, and the fields a caller replaces in them.

    ``changes`` (stage -> field -> value) is how a test shrinks a run or the ablation's label-efficiency
    curve sets another RL-pool size, without a recipe of its own; :meth:`fields` is what a stage runs
    with, so what the report shows and what a resumed ablation compares.
    """

    folder: Path
    changes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def named(cls, name: str) -> Plan:
        """A packaged plan (``demo/quick``) or, when ``name`` is a folder, that folder's recipes."""
        folder = Path(name) if Path(name).is_dir() else RECIPES / name
        if not folder.is_dir():
            packaged = sorted(str(p.parent.relative_to(RECIPES)) for p in RECIPES.glob("*/*/sft.yaml"))
            raise DataError(f"no recipe folder {name}; the packaged plans are {', '.join(packaged)}")
        return cls(folder)

    @property
    def label(self) -> str:
        """How reports name the plan: ``recipes/demo/quick`` for a packaged one (the name a user finds in
        the repository and the docs, wherever the package is installed), else its folder."""
        folder = Path(self.folder).resolve()
        if folder.is_relative_to(RECIPES):
            return f"recipes/{folder.relative_to(RECIPES).as_posix()}"
        return str(self.folder)

    def recipe(self, stage: str) -> Path:
        path = Path(self.folder) / f"{stage}.yaml"
        if not path.is_file():
            raise DataError(f"the plan {self.folder} has no {stage}.yaml recipe")
        return path

    def has(self, stage: str) -> bool:
        return (Path(self.folder) / f"{stage}.yaml").is_file()

    def fields(self, stage: str) -> dict[str, Any]:
        """The recipe's fields as written (YAML), with this plan's changes."""
        import yaml

        written = yaml.safe_load(self.recipe(stage).read_text()) or {}
        if not isinstance(written, dict):
            raise DataError(f"{self.recipe(stage)} must hold a YAML mapping of fields")
        return {**written, **self.changes.get(stage, {})}

    def replace(self, stage: str, **fields: Any) -> Plan:
        """This plan with ``fields`` of ``stage``'s recipe replaced."""
        changes = {k: dict(v) for k, v in self.changes.items()}
        changes.setdefault(stage, {}).update(fields)
        return Plan(self.folder, changes)

    def record(self) -> dict[str, dict[str, Any]]:
        """Every recipe's fields (JSON-ready): the report's plan, and what a resumed run must match."""
        return json.loads(json.dumps({s: self.fields(s) for s in STAGES if self.has(s)}, default=str))


def as_flags(values: Mapping[str, Any]) -> list[str]:
    """``--field value`` for each run value (paths, lists of paths, numbers), as on a command line."""
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, bool):
            flags += [f"--{key}", str(value).lower()]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def read_recipe(plan: Plan, stage: str, parse, run: Mapping[str, Any] | None = None) -> tuple:
    """``parse(["--config", recipe, *run flags])``: the recipe of ``stage`` read by a ``TrlParser``.

    A plan with changes for ``stage`` is written, recipe and changes merged, to a temporary YAML file
    read the same way. A recipe the parser refuses (an unknown field, a bad value) is one line.
    """
    import yaml

    flags = as_flags(run or {})
    try:
        if not plan.changes.get(stage):
            return parse(["--config", str(plan.recipe(stage)), *flags])
        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / f"{stage}.yaml"
            merged.write_text(yaml.safe_dump(plan.fields(stage), sort_keys=False))
            return parse(["--config", str(merged), *flags])
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        if stage in ("sft", "grpo_dual", "grpo_oracle"):
            from cellduality.train.stage import recipe_error_message

            argv = ["--config", str(plan.recipe(stage))]
            message = recipe_error_message("sft" if stage == "sft" else "grpo", argv, exc)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"{first} (recipe {plan.recipe(stage)})"
        raise DataError(message) from exc


def _parser(*types: type):
    """``TrlParser(types).parse_args_and_config``: how every recipe is read."""
    from trl import TrlParser

    return TrlParser(types).parse_args_and_config


def read_stage(plan: Plan, stage: str, run: Mapping[str, Any] | None = None) -> tuple:
    """The recipe of ``stage`` read by its own parser, with the run's ``--field value`` flags: the SFT and
    GRPO recipes by ``cellduality sft`` / ``grpo``'s ``parse_args`` (our arguments, TRL's config and
    ``ModelConfig``), the others into the dataclasses above (prepare: with ``TaskConfig``)."""
    if stage == "sft":
        from cellduality.train.sft import parse_args
    elif stage.startswith("grpo_"):
        from cellduality.train.grpo import parse_args
    elif stage == "prepare":
        from cellduality.tasks import TaskConfig

        parse_args = _parser(PrepareArguments, TaskConfig)
    elif stage == "eval":
        parse_args = _parser(EvalArguments)
    elif stage == "dual_check":
        parse_args = _parser(DualCheckArguments)
    else:
        raise ValueError(f"no stage {stage!r}; the stages are {', '.join(STAGES)}")
    return read_recipe(plan, stage, parse_args, run)


# ----------------------------------------------------------------------------------------------------
# the stages


def prepare(plan: Plan, out: Path, seed: int, console: Any = None) -> list[Path]:
    """``cellduality prepare`` of each dataset of the prepare recipe into ``out/prepared/<name>``."""
    from cellduality.data import load_dataset
    from cellduality.reporting import print_prepared
    from cellduality.tasks import build_tasks, save_prepared

    args, config = read_stage(plan, "prepare", {"seed": seed})
    folders = []
    for name in args.datasets:
        prepared = build_tasks(load_dataset(name), config=config, split=args.split)
        folder = save_prepared(prepared, Path(out) / "prepared" / name)
        print_prepared(prepared, folder, console)
        folders.append(folder)
    return folders


def sft(plan: Plan, out: Path, folders: Sequence[Path], seed: int, name: str = "sft", **run: Any):
    """The SFT recipe into ``out/<name>``, from the tiny model built at ``out/model``; returns the trainer.

    ``run`` adds (or replaces) ``--field value`` flags after the recipe, like ``max_steps`` for a benchmark.
    """
    from cellduality.train.sft import run_sft

    out = Path(out)
    values = {
        "output_dir": out / name,
        "model_name_or_path": out / "model",
        "dataset": [str(f) for f in folders],
        "prepared_dir": out / "train_prepared",
        "sft_data": out / "sft_data",
        "seed": seed,
        "data_seed": seed,
        **run,
    }
    return run_sft(*read_stage(plan, "sft", values))


def grpo(
    plan: Plan,
    out: Path,
    folders: Sequence[Path],
    seed: int,
    arm: str = "dual",
    name: str = "grpo",
    start: str = "sft",
    **run: Any,
):
    """The GRPO recipe of ``arm`` (``grpo_dual.yaml`` or ``grpo_oracle.yaml``) from ``out/<start>`` into
    ``out/<name>``; returns the trainer (its log history holds the rewards)."""
    from cellduality.train.grpo import run_grpo

    out = Path(out)
    values = {
        "output_dir": out / name,
        "model_name_or_path": out / start,
        "dataset": [str(f) for f in folders],
        "prepared_dir": out / "train_prepared",
        "seed": seed,
        "data_seed": seed,
        **run,
    }
    return run_grpo(*read_stage(plan, f"grpo_{arm}", values))


def eval_settings(plan: Plan) -> EvalArguments:
    """The eval recipe, read."""
    (args,) = read_stage(plan, "eval")
    return args


def evaluate(
    plan: Plan,
    out: Path,
    folders: Sequence[Path],
    seed: int,
    models: Sequence[tuple[str, str]],
    temperature: float = 0.0,
    report: Path | None = None,
) -> dict[str, Any]:
    """``cellduality eval`` of the checkpoints ``out/<folder>`` (each as its name) next to the baselines,
    into ``report`` (default ``out/report``), one report per prepared folder; ``temperature`` > 0 scores
    sampled answers (seeded) instead of greedy ones."""
    from cellduality.eval.runner import EvalConfig, run_eval_many
    from cellduality.inference.generate import GenerationSettings, ModelSpec

    args = eval_settings(plan)
    out = Path(out)
    config = EvalConfig(
        out_dir=report or out / "report",
        models=[ModelSpec(str(out / folder), name=name) for name, folder in models],
        max_examples=args.max_examples,
        generation=GenerationSettings(
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=seed, temperature=temperature
        ),
        cache_dir=out / "eval_cache",
        backend=args.backend,
        seed=seed,
    )
    return run_eval_many(folders, config)


def dual_check(
    plan: Plan,
    out: Path,
    folders: Sequence[Path],
    seed: int,
    models: Sequence[tuple[str, str]] = (("SFT", "sft"), ("dual GRPO", "grpo")),
) -> dict[str, Any]:
    """``cellduality dual-check`` of each checkpoint ``out/<folder>`` into
    ``out/report/dual_check/<folder>``: name -> its checks."""
    from cellduality.eval.dual_check import DualCheckConfig, run_dual_check

    (args,) = read_stage(plan, "dual_check")
    config = DualCheckConfig(
        max_rows=args.max_rows,
        group_size=args.group_size,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=seed,
    )
    out = Path(out)
    return {
        name: run_dual_check(
            str(out / folder),
            folders,
            config,
            out_dir=out / "report" / "dual_check" / folder,
            backend=args.backend,
        )
        for name, folder in models
    }
