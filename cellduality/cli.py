"""The ``cellduality`` command: prepare, demo and the other stages, one subcommand each.

Heavy libraries (torch, trl, scanpy) are imported inside the subcommands so ``cellduality --help``
answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="embedded dataset name or path to an .h5ad file")
    p.add_argument("--out", required=True, type=Path, help="output folder (DatasetDict + meta.json)")
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=["annotation", "generation", "drug_sensitivity", "perturbation"],
        help="tasks to build (default: every task the dataset supports)",
    )
    p.add_argument("--top-k", type=int, default=100, help="genes per input cell sentence (default 100)")
    p.add_argument("--n-genes", type=int, default=None, help="genes per generated cell (default: --top-k)")
    p.add_argument("--split", choices=["id", "ood"], default="id", help="in- or out-of-distribution split")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument(
        "--holdout", nargs="+", default=None, help="OOD: values to hold out (default: seeded choice)"
    )
    p.add_argument(
        "--hidden-fraction", type=float, default=0.25, help="share of genes hidden for in-painting"
    )
    p.add_argument("--max-examples", type=int, default=None, help="cap on examples per task and split")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("your own .h5ad: column names")
    g.add_argument("--cell-type-col")
    g.add_argument("--drug-col")
    g.add_argument("--response-col", help="sensitive/resistant label column")
    g.add_argument("--sensitive-value", default="sensitive")
    g.add_argument("--resistant-value", default="resistant")
    g.add_argument("--perturbation-col")
    g.add_argument("--control-value", default="control")
    g.add_argument("--perturbation-kind", choices=["genetic", "chemical"], default="genetic")
    g.add_argument("--direction-col", help="genetic: column with CRISPRi/CRISPRa or knockdown/overexpression")
    g.add_argument("--default-direction", default="knockdown")
    g.add_argument("--dose-col")
    g.add_argument("--context-cols", nargs="+", default=(), help="cell line, donor ... (shown in prompts)")
    g.add_argument("--layer", help="take expression from this layer instead of .X")
    g.add_argument("--gene-symbols", help="var column holding gene symbols (default: var_names, IDs mapped)")
    g.add_argument("--allow-scaled", action="store_true", help="rank z-scored values (no .raw available)")


def _columns_from_args(args: argparse.Namespace):
    from cellduality.data import Columns

    given = [args.cell_type_col, args.drug_col, args.response_col, args.perturbation_col]
    if not any(given):
        return None
    return Columns(
        cell_type=args.cell_type_col,
        drug=args.drug_col,
        response=args.response_col,
        sensitive_value=args.sensitive_value,
        resistant_value=args.resistant_value,
        perturbation=args.perturbation_col,
        control_value=args.control_value,
        perturbation_kind=args.perturbation_kind,
        direction=args.direction_col,
        default_direction=args.default_direction,
        dose=args.dose_col,
        context=tuple(args.context_cols),
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    from cellduality.data import load_dataset
    from cellduality.reporting import print_prepared
    from cellduality.tasks import TaskConfig, build_tasks, save_prepared

    data = load_dataset(
        args.dataset,
        _columns_from_args(args),
        layer=args.layer,
        gene_symbols=args.gene_symbols,
        allow_scaled=True if args.allow_scaled else None,
    )
    cfg = TaskConfig(
        top_k=args.top_k,
        n_genes=args.n_genes,
        hidden_fraction=args.hidden_fraction,
        max_examples=args.max_examples,
        seed=args.seed,
    )
    prepared = build_tasks(
        data, args.tasks, split=args.split, config=cfg, test_fraction=args.test_fraction, holdout=args.holdout
    )
    out = save_prepared(prepared, args.out)
    print_prepared(prepared, out)
    return 0


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
    print(f"tiny model ({len(prepared.genes)} genes in the vocabulary) written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellduality.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from cellduality.ablation import ABLATION, TINY, AblationConfig, run_ablation

    if not args.seeds:
        raise SystemExit("cellduality ablation: error: give at least one --seeds value")
    run_ablation(AblationConfig(out=args.out, seeds=tuple(args.seeds), plan=TINY if args.tiny else ABLATION))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellduality",
        description="Cell sentences, the 2x2 single-cell task suite, dual-task rewards and training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build task examples from an embedded dataset or an .h5ad file")
    _add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)
    t = sub.add_parser("tiny-model", help="build the tiny offline Llama + gene tokenizer (demo and tests)")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument(
        "--dataset", nargs="+", default=["pbmc68k"], help="embedded names or prepared folders (vocabulary)"
    )
    t.add_argument("--top-k", type=int, default=100, help="genes per sentence when building from raw data")
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_model)
    d = sub.add_parser("demo", help="run the end-to-end demo on the embedded real data")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--quick", action="store_true", help="a smaller, faster run")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    a = sub.add_parser(
        "ablation",
        help="SFT vs dual GRPO vs oracle GRPO over seeds on the embedded data (resumes when run again)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--out", type=Path, default=Path("ablation_out"), help="run folder (reused to resume)")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed")
    a.add_argument("--tiny", action="store_true", help="a tiny budget (minutes): checks the pipeline only")
    a.set_defaults(func=cmd_ablation)
    from cellduality.eval.command import add_parser as add_eval

    add_eval(sub)
    from cellduality.teacher.command import add_parser as add_sft_data

    add_sft_data(sub)
    from cellduality.eval.dual_check_command import add_parser as add_dual_check

    add_dual_check(sub)
    from cellduality.predict.command import add_parser as add_predict

    add_predict(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
