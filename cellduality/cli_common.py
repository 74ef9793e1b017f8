"""Flags and checks that several ``cellduality`` subcommands share (prepare, eval, sft-data, sft, grpo).

Standard library only at import time, so ``cellduality --help`` stays instant. The subcommand modules
(``cellduality.cli``, ``cellduality.eval.command``, ``cellduality.teacher.command``) import from here
and never from each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: ``--split`` means the same everywhere: how cells are split into train and test.
SPLIT_MODES = ("id", "ood")
TASK_CHOICES = ["annotation", "generation", "drug_sensitivity", "perturbation", "neighbourhood"]

#: Column flags whose defaults are filled in only for a user's file, so that for an embedded dataset
#: a flag that was not given leaves the dataset's own preset alone.
COLUMN_DEFAULTS: dict[str, Any] = {
    "sensitive_value": "sensitive",
    "resistant_value": "resistant",
    "control_value": "control",
    "perturbation_kind": "genetic",
    "default_direction": "knockdown",
    "combo_sep": "+",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """``cellduality``'s parsers (its subcommands inherit the class): a mistake on the command line is
    one line and exit code 2, like every other ``cellduality`` error; ``--help`` shows the usage."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # kept for error(): argparse reports a subcommand's unknown flag from the top parser
        self._seen_args = list(args) if args is not None else None
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        parser = self._chosen_subparser()
        hint = self._close_matches(parser) if message.startswith(("unrecognized", "the following")) else ""
        self.exit(2, f"{parser.prog}: error: {message}{hint} (see {parser.prog} --help)\n")

    def _chosen_subparser(self) -> argparse.ArgumentParser:
        """The subcommand's parser when one was named (argparse reports its unknown flags from the top)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                seen = getattr(self, "_seen_args", None) or []
                chosen = next((a for a in seen if a in action.choices), None)
                if chosen is not None:
                    return action.choices[chosen]
        return self

    def _close_matches(self, parser: argparse.ArgumentParser) -> str:
        """``; --outt: did you mean --out?`` for each mistyped flag given to ``parser``.

        Why: Python 3.11's argparse names an unknown flag but not the one meant (and a missing required
        flag hides the mistyped one entirely); one wrong letter should not send a user to ``--help``.
        """
        import difflib

        known = [o for o in parser._option_string_actions if o.startswith("--")]
        seen = getattr(parser, "_seen_args", None) or getattr(self, "_seen_args", None) or []
        hints = []
        for token in seen:
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
                if close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
        return "; " + "; ".join(hints) if hints else ""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of descriptions and epilogs, and appends ``(default: X)`` to every option
    that has a default worth showing (not ``None``/``False``) and does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS
        if (
            action.option_strings
            and not hidden
            and not (isinstance(default, (list, tuple)) and not default)
            and "default" not in text
        ):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text = f"{text} (default: {shown})" if text else f"(default: {shown})"
        return text


def split_mode(value: str) -> str:
    """``--split``'s type: id or ood, with a pointer when a split *name* is given by mistake."""
    if value in SPLIT_MODES:
        return value
    if value in ("train", "test"):
        raise argparse.ArgumentTypeError(
            f"{value!r}: --split is how cells are split (id or ood), as in `cellduality prepare`; "
            "to evaluate the examples of the train or test split use --eval-split"
        )
    raise argparse.ArgumentTypeError(f"{value!r} is not a split kind: choose id or ood")


def add_split_args(
    g: argparse._ActionsContainer, *, holdout: bool = True, test_fraction: bool = True
) -> None:
    """``--split`` (id/ood), ``--test-fraction`` and ``--holdout``."""
    g.add_argument(
        "--split",
        type=split_mode,
        default="id",
        metavar="{id,ood}",
        help="id: a random share of the cells is held out; ood: whole cell types / drugs / perturbations",
    )
    if test_fraction:
        g.add_argument("--test-fraction", type=float, default=0.2, help="share held out for the test split")
    if holdout:
        g.add_argument(
            "--holdout",
            nargs="+",
            default=None,
            metavar="VALUE",
            help="with --split ood: the values to hold out (default: a seeded choice of about "
            "--test-fraction of them)",
        )


def add_sentence_args(g: argparse._ActionsContainer) -> None:
    """``--top-k`` and ``--n-genes``: the sentence settings a model is trained with."""
    g.add_argument("--top-k", type=int, default=100, help="genes per input cell sentence")
    g.add_argument(
        "--n-genes", type=int, default=None, help="genes per generated cell (default: the --top-k value)"
    )


def add_neighbourhood_args(g: argparse._ActionsContainer) -> None:
    """The knowledge graph and the caps of the neighbourhood-editing task (``--tasks neighbourhood``)."""
    g.add_argument(
        "--graph",
        metavar="FILE",
        help="gene-gene edge list (two gene columns, optional weight last; .gz ok), e.g. STRING "
        "(default: GO Biological Process from the embedded knowledge tables)",
    )
    g.add_argument(
        "--graph-min-weight", type=float, help="drop edges lighter than this (e.g. 700 for STRING)"
    )
    g.add_argument("--max-neighbours", type=int, default=20, help="graph neighbours shown per target")
    g.add_argument(
        "--max-additions", type=int, default=50, help="training perturbations offered for addition (0: all)"
    )


def add_column_args(g: argparse._ActionsContainer) -> None:
    """The obs column flags of a user's ``.h5ad`` (also overrides for an embedded dataset's preset)."""
    g.add_argument("--cell-type-col", metavar="COL", help="cell-type labels (annotation, generation)")
    g.add_argument("--drug-col", metavar="COL", help="drug names (drug sensitivity)")
    g.add_argument("--response-col", metavar="COL", help="sensitive/resistant labels (drug sensitivity)")
    g.add_argument("--sensitive-value", help="value of --response-col meaning sensitive (default: sensitive)")
    g.add_argument("--resistant-value", help="value of --response-col meaning resistant (default: resistant)")
    g.add_argument("--perturbation-col", metavar="COL", help="condition of each cell (perturbation)")
    g.add_argument(
        "--control-value", help="value of --perturbation-col marking control cells (default: control)"
    )
    g.add_argument(
        "--perturbation-kind",
        choices=["genetic", "chemical"],
        help="genetic: targets are genes; chemical: a drug (default: genetic)",
    )
    g.add_argument(
        "--combo-sep",
        metavar="SEP",
        help="genetic: what joins the targets of a combination, e.g. '_' for A_B (default: +, which "
        "also reads GEARS' A+ctrl)",
    )
    g.add_argument(
        "--direction-col",
        metavar="COL",
        help="genetic: column with CRISPRi/CRISPRa or knockdown/overexpression",
    )
    g.add_argument(
        "--default-direction",
        help="genetic: words for the perturbation without --direction-col (default: knockdown)",
    )
    g.add_argument("--dose-col", metavar="COL", help="chemical: dose of each cell's treatment")
    g.add_argument(
        "--context-cols",
        nargs="+",
        default=None,
        metavar="COL",
        help="cell line, donor ... (shown in prompts)",
    )
    g.add_argument("--layer", help="take expression from this layer instead of .X")
    g.add_argument(
        "--gene-symbols",
        metavar="COL",
        help="var column holding gene symbols (default: var_names; IDs there are read from a symbol column "
        "such as feature_name, or mapped)",
    )
    g.add_argument(
        "--allow-scaled", action="store_true", help="rank z-scored values (only when no .raw is available)"
    )


_FLAG_OF = {
    "cell_type": "cell_type_col",
    "drug": "drug_col",
    "response": "response_col",
    "sensitive_value": "sensitive_value",
    "resistant_value": "resistant_value",
    "perturbation": "perturbation_col",
    "control_value": "control_value",
    "perturbation_kind": "perturbation_kind",
    "combo_sep": "combo_sep",
    "direction": "direction_col",
    "default_direction": "default_direction",
    "dose": "dose_col",
    "context": "context_cols",
}
_LABEL_FIELDS = ("cell_type", "drug", "response", "perturbation")


def columns_from_args(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """``(Columns or None, notes)`` from the column flags.

    For an embedded dataset the flags override its preset field by field (the rest, e.g. the direction
    map and context of ``norman_devel``, is kept) and a note says what changed. For a file, ``None``
    when no label column is named (loading then lists the columns that exist).
    """
    from dataclasses import replace

    from cellduality.data import EMBEDDED, Columns

    given = {
        name: (tuple(value) if name == "context" else value)
        for name, flag in _FLAG_OF.items()
        if (value := getattr(args, flag, None)) is not None
    }
    dataset = getattr(args, "dataset", None)
    if isinstance(dataset, str) and dataset in EMBEDDED:
        preset = EMBEDDED[dataset].columns
        if not given:
            return None, []
        columns = replace(preset, **given)
        changed = ", ".join(f"--{_FLAG_OF[k].replace('_', '-')} {v!r}" for k, v in given.items())
        return columns, [f"embedded dataset {dataset}: preset columns kept except {changed}"]
    if not any(given.get(f) for f in _LABEL_FIELDS):
        return None, []
    values = {**COLUMN_DEFAULTS, **given}
    return Columns(**values), []


def _task_config(args: argparse.Namespace, hidden_fraction: float | None):
    from cellduality.tasks import TaskConfig

    return TaskConfig(  # checks the numbers before anything is read
        top_k=args.top_k,
        n_genes=args.n_genes,
        hidden_fraction=0.25 if hidden_fraction is None else hidden_fraction,
        max_examples=args.max_examples,
        sft_examples=getattr(args, "sft_examples", None),
        rl_examples=getattr(args, "rl_examples", None),
        seed=args.seed,
        graph=str(Path(args.graph).resolve()) if getattr(args, "graph", None) else None,
        graph_min_weight=getattr(args, "graph_min_weight", None),
        max_neighbours=getattr(args, "max_neighbours", 20),
        max_additions=getattr(args, "max_additions", 50),
    )


def build_from_args(args: argparse.Namespace, *, hidden_fraction: float | None = None):
    """``(CellData, PreparedTasks)`` from the shared data flags (``prepare``, ``eval --dataset``)."""
    from cellduality.data import load_dataset
    from cellduality.tasks import build_tasks

    cfg = _task_config(args, hidden_fraction)
    columns, notes = columns_from_args(args)
    if columns is not None:
        columns.check()
    data = load_dataset(
        args.dataset,
        columns,
        layer=args.layer,
        gene_symbols=args.gene_symbols,
        allow_scaled=True if args.allow_scaled else None,
    )
    data.notes[:0] = notes
    prepared = build_tasks(
        data, args.tasks, split=args.split, config=cfg, test_fraction=args.test_fraction, holdout=args.holdout
    )
    return data, prepared


def prepare_file_blockwise(args: argparse.Namespace, out: Path):
    """``prepare`` of an ``.h5ad`` file read block by block into ``out`` (``PreparedTasks``, written)."""
    from cellduality.tasks.blockwise import prepare_blockwise

    cfg = _task_config(args, args.hidden_fraction)
    columns, notes = columns_from_args(args)
    if columns is not None:
        columns.check()
    return prepare_blockwise(
        args.dataset,
        columns,
        out,
        tasks=args.tasks,
        split=args.split,
        config=cfg,
        test_fraction=args.test_fraction,
        holdout=args.holdout,
        layer=args.layer,
        gene_symbols=args.gene_symbols,
        allow_scaled=True if args.allow_scaled else None,
        block_cells=args.block_cells,
        workers=args.workers,
        notes=notes,
    )


def check_out_dir(path: Path | str, flag: str = "--out") -> Path:
    """``path`` as an output folder: refused (``DataError``) when it is an existing file."""
    from cellduality.data.schema import DataError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DataError(f"{flag} {out} is an existing file; give a folder to write into (it is created)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise DataError(f"{flag} {out}: {parent} is a file, not a folder")
    return out


def saved_to(stage: str, path: Path | str, what: str = "") -> str:
    """The last line of every stage: where its output is."""
    return f"cellduality {stage}: saved to {path}" + (f" ({what})" if what else "")
