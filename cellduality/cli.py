"""The ``cellduality`` command: prepare, demo and the other stages, one subcommand each.

Heavy libraries (torch, trl, scanpy) are imported inside the subcommands so ``cellduality --help``
answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cellduality.cli_common import (
    TASK_CHOICES,
    HelpFormatter,
    OneLineErrorParser,
    add_column_args,
    add_neighbourhood_args,
    add_sentence_args,
    add_split_args,
    build_from_args,
    check_out_dir,
    prepare_file_blockwise,
    saved_to,
)


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="embedded dataset name or path to an .h5ad file")
    p.add_argument("--out", required=True, type=Path, help="output folder (DatasetDict + meta.json)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the prepared dataset already in --out (without it, such a folder is refused)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=TASK_CHOICES,
        help="tasks to build (default: every task of the 2x2 suite the dataset supports; neighbourhood "
        "editing only when named, with --split ood)",
    )
    add_sentence_args(p)
    add_split_args(p)
    p.add_argument(
        "--hidden-fraction", type=float, default=0.25, help="share of genes hidden for in-painting, in (0, 1)"
    )
    p.add_argument(
        "--max-examples", type=int, default=None, help="cap on examples per task and split (default: all)"
    )
    p.add_argument(
        "--sft-examples",
        type=int,
        default=None,
        metavar="N",
        help="the paper's data design: N labelled training cells per task form the SFT set (split "
        "'train': the teacher, SFT and every label-fitted statistic read it only); the rest of the "
        "training cells form the RL pool (split 'rl': GRPO's prompts, no label read by a "
        "self-supervised reward). Default: no RL pool, GRPO trains on the train split",
    )
    p.add_argument(
        "--rl-examples",
        type=int,
        default=None,
        metavar="N",
        help="with --sft-examples: cap on RL-pool prompt cells per task (seeded sample; default all)",
    )
    p.add_argument("--seed", type=int, default=0, help="split, tie order, templates")
    b = p.add_argument_group(
        "reading an .h5ad file block by block (the default for files; embedded datasets are read whole)"
    )
    b.add_argument(
        "--block-cells",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="cells read, normalised and turned into sentences at a time: peak memory grows with N, not "
        "with the file",
    )
    b.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N", help="processes that build the examples"
    )
    b.add_argument(
        "--in-memory",
        action="store_true",
        help="read the whole file into memory first (the path before block-wise reading; same output)",
    )
    add_neighbourhood_args(p.add_argument_group("neighbourhood editing (--tasks neighbourhood)"))
    g = p.add_argument_group(
        "columns of your own .h5ad (for an embedded dataset: overrides of its preset, the rest is kept)"
    )
    add_column_args(g)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return number


def cmd_prepare(args: argparse.Namespace) -> int:
    from cellduality.data import EMBEDDED
    from cellduality.reporting import print_prepared
    from cellduality.tasks import save_prepared

    out = check_prepare_out(check_out_dir(args.out), args.overwrite)
    is_file = args.dataset not in EMBEDDED and Path(args.dataset).suffix.lower() == ".h5ad"
    if is_file and not args.in_memory and "neighbourhood" not in (args.tasks or []):
        prepared = prepare_file_blockwise(args, out)
    else:
        _, prepared = build_from_args(args, hidden_fraction=args.hidden_fraction)
        out = save_prepared(prepared, out)
    print_prepared(prepared, out)
    print(saved_to("prepare", out, "data/ + meta.json"))
    return 0


def check_prepare_out(out: Path, overwrite: bool) -> Path:
    """Refuse to write over a prepared dataset unless ``--overwrite``, and never into folders not ours.

    Why: a second ``prepare`` with another ``--dataset`` or settings and the same ``--out`` used to replace
    the first one's rows and ``meta.json`` without a word, and the checkpoints trained on it lost their
    data. ``data/`` or ``tables/`` without ``meta.json`` belong to something else: refused even with
    ``--overwrite``.
    """
    from cellduality.data.schema import DataError
    from cellduality.tasks.build import META_FILE, TABLES_DIR

    if (out / META_FILE).exists():
        if not overwrite:
            raise DataError(
                f"{out} already holds a prepared dataset ({META_FILE}); give another --out, or --overwrite to "
                "replace it"
            )
        return out
    for name in ("data", TABLES_DIR):
        if (out / name).exists():
            raise DataError(
                f"{out / name} exists and is not part of a prepared dataset (no {META_FILE} beside it); give "
                "another --out"
            )
    return out


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from cellduality.data import load_dataset
    from cellduality.modeling import build_tiny_model
    from cellduality.modeling.tiny import is_tiny_model_dir, refuse_unless_empty
    from cellduality.tasks import TaskConfig, build_tasks, load_prepared, merge_prepared
    from cellduality.tasks.build import META_FILE
    from cellduality.train.common import texts_of_tasks

    if not is_tiny_model_dir(args.out):  # a tiny model may be rebuilt; anything else is never overwritten
        refuse_unless_empty(Path(args.out))
    parts = []
    for source in args.dataset:
        if (Path(source) / META_FILE).exists():
            parts.append(load_prepared(source))
        else:
            parts.append(build_tasks(load_dataset(source), config=TaskConfig(top_k=args.top_k)))
    prepared = merge_prepared(parts)
    out = build_tiny_model(
        args.out,
        prepared.genes,
        texts_of_tasks(prepared),
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )
    print(saved_to("tiny-model", out, f"tiny model, {len(prepared.genes)} genes in the vocabulary"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellduality.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, recipes=args.recipes)
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from cellduality.ablation import ABLATION, TINY, AblationConfig, run_ablation
    from cellduality.stages import Plan

    if not args.seeds:
        raise SystemExit("cellduality ablation: error: give at least one --seeds value")
    plan = Plan.named(str(args.recipes)) if args.recipes else TINY if args.tiny else ABLATION
    if any(size < 1 for size in args.pool_sizes):
        raise SystemExit(
            "cellduality ablation: error: --pool-sizes are prompt cells per task, each at least 1"
        )
    run_ablation(
        AblationConfig(out=args.out, seeds=tuple(args.seeds), plan=plan, pool_sizes=tuple(args.pool_sizes))
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="cellduality",
        description="Cell sentences, the 2x2 single-cell task suite, dual-task rewards and training.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="build task examples from an embedded dataset or an .h5ad file",
        description="Validate and normalise a dataset, turn its cells into cell sentences and write the task "
        "examples (train/test) and meta.json into --out. Every fix applied is printed as a note.",
        formatter_class=HelpFormatter,
    )
    _add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)
    from cellduality.teacher.command import add_parser as add_sft_data

    add_sft_data(sub)
    from cellduality.train.command import add_parsers as add_training

    add_training(sub)
    from cellduality.eval.command import add_parser as add_eval

    add_eval(sub)
    t = sub.add_parser(
        "tiny-model",
        help="build the tiny offline Llama + gene tokenizer (demo and tests)",
        formatter_class=HelpFormatter,
    )
    t.add_argument("--out", required=True, type=Path, help="folder to build it in (empty or missing)")
    t.add_argument(
        "--dataset", nargs="+", default=["pbmc68k"], help="embedded names or prepared folders (vocabulary)"
    )
    t.add_argument("--top-k", type=int, default=100, help="genes per sentence when building from raw data")
    t.add_argument("--hidden-size", type=int, default=64, help="width")
    t.add_argument("--num-layers", type=int, default=2, help="depth")
    t.add_argument("--seed", type=int, default=0, help="initial weights")
    t.set_defaults(func=cmd_tiny_model)
    d = sub.add_parser(
        "demo", help="run the end-to-end demo on the embedded real data", formatter_class=HelpFormatter
    )
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller, faster run (recipes/demo/quick)")
    size.add_argument(
        "--recipes",
        type=Path,
        metavar="FOLDER",
        help="a folder of stage recipes (prepare, sft, grpo_dual, eval, dual_check .yaml) to run instead of "
        "the packaged recipes/demo/full: copy that folder and edit it",
    )
    d.add_argument("--seed", type=int, default=0, help="every random choice")
    d.set_defaults(func=cmd_demo)
    a = sub.add_parser(
        "ablation",
        help="SFT vs dual GRPO vs oracle GRPO over seeds on the embedded data (resumes when run again)",
        formatter_class=HelpFormatter,
    )
    a.add_argument("--out", type=Path, default=Path("ablation_out"), help="run folder (reused to resume)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed")
    size = a.add_mutually_exclusive_group()
    size.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny budget (minutes): checks the pipeline only (recipes/ablation/tiny)",
    )
    size.add_argument(
        "--recipes",
        type=Path,
        metavar="FOLDER",
        help="a folder of stage recipes (as recipes/ablation/full, with grpo_oracle.yaml) to run instead of the "
        "packaged ones",
    )
    a.add_argument(
        "--pool-sizes",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also train dual GRPO with RL pools of N prompt cells per task (the label-efficiency curve: "
        "dual GRPO − SFT against the unlabelled pool's size, pool_sizes.png in the report)",
    )
    a.set_defaults(func=cmd_ablation)
    from cellduality.eval.dual_check_command import add_parser as add_dual_check

    add_dual_check(sub)
    from cellduality.predict.command import add_parser as add_predict

    add_predict(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("sft", "grpo"):  # TRL parses their flags (recipe + --field value overrides)
        from cellduality.train.command import run_stage

        return run_stage(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    from cellduality.data import DataError
    from cellduality.modeling.tiny import TinyModelRefused

    try:
        return int(args.func(args) or 0)
    except (DataError, TinyModelRefused) as exc:
        print(f"cellduality {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
