"""The ``cellduality eval`` subcommand: flags and handler (heavy imports happen inside the handler).

Register it with ``cellduality.eval.command.add_parser(subparsers)`` in ``cellduality/cli.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellduality.cli_common import (
    TASK_CHOICES,
    HelpFormatter,
    add_column_args,
    add_sentence_args,
    add_split_args,
    check_out_dir,
    saved_to,
)

EPILOG = """\
examples:
  cellduality eval --prepared prepared/pbmc --model out/sft --model out/grpo --out eval/pbmc
  cellduality eval --prepared prepared/norman --model meta-llama/Llama-3.2-3B-Instruct,adapter=out/lora,name=grpo \\
      --self-verify 4 --out eval/norman
  cellduality eval --dataset pbmc68k --tasks annotation generation --max-examples 200 --out eval/baselines
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``cellduality``'s subparsers and return its parser."""
    p = subparsers.add_parser(
        "eval",
        help="benchmark models (and baselines) on a prepared dataset: metrics.json, report.md, plots",
        description=(
            "Generate with each model on the examples of a split (cached per model), score every task, put "
            "baselines in the same tables and write metrics.json, report.md and PNG plots into --out."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH[,adapter=DIR][,name=LABEL]",
        help="a Hugging Face folder, checkpoint or hub id; repeat to compare models (none: baselines only)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prepared",
        type=Path,
        nargs="+",
        help="folder(s) written by `cellduality prepare`; several: one report each under OUT/<name> + OUT/index.md",
    )
    src.add_argument(
        "--dataset",
        help="embedded dataset name or .h5ad path: examples are built on the fly (see --top-k ...)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--eval-split",
        choices=["test", "train"],
        default="test",
        help="which examples to evaluate: the test split, or the train split (a sanity check)",
    )
    p.add_argument(
        "--tasks", nargs="+", choices=TASK_CHOICES, help="tasks to evaluate (default: all present)"
    )
    p.add_argument("--max-examples", type=int, help="cap per task (seeded sample, the same for every model)")
    p.add_argument(
        "--data",
        help="the .h5ad the prepared examples came from (default: the file `prepare` recorded in the prepared "
        "folder, read with its --layer and --gene-symbols; give it when the file has moved)",
    )
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    g.add_argument("--max-new-tokens", type=int, default=512, help="longest completion")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    g.add_argument(
        "--backend",
        choices=["auto", "hf", "vllm"],
        default="auto",
        help="auto: vLLM if installed and a GPU is there",
    )
    g.add_argument("--cache-dir", type=Path, help="completion cache (default OUT/cache)")
    g.add_argument(
        "--self-verify",
        type=int,
        default=0,
        metavar="N",
        help="also report: N sampled answers per example, keep the one whose dual task the model solves best",
    )
    g.add_argument(
        "--self-verify-temperature", type=float, default=1.0, help="sampling temperature of --self-verify"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("scoring")
    s.add_argument("--no-baselines", action="store_true", help="models only, no baselines")
    s.add_argument("--no-plots", action="store_true", help="no PNG plots")
    s.add_argument("--knn-k", type=int, default=3, help="neighbours of the kNN metrics")
    s.add_argument("--n-de", type=int, default=20, help="top differentially expressed genes")
    s.add_argument("--seed", type=int, default=0, help="example caps, sampling, baselines")
    s.add_argument(
        "--cell-eval",
        action="store_true",
        help="also score perturbation predictions with cell-eval's MetricsEvaluator (needs the .[eval] extra)",
    )
    b = p.add_argument_group("--dataset: building examples (as `cellduality prepare`)")
    add_sentence_args(b)
    add_split_args(b)
    c = p.add_argument_group(
        "--dataset: columns of your own .h5ad (as `cellduality prepare`); with --prepared, --layer and "
        "--gene-symbols default to what `prepare` recorded"
    )
    add_column_args(c)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``cellduality eval``."""
    from rich.console import Console

    from cellduality.eval.runner import EvalConfig, run_eval
    from cellduality.inference.generate import GenerationSettings, ModelSpec
    from cellduality.modeling.checkpoint import check_model_folder

    console = Console(stderr=True)
    try:
        models = [ModelSpec.parse(text) for text in args.model]
        for spec in models:  # before any data is read: a mistyped path is reported at once
            check_model_folder(spec.path, spec.adapter)
            resolved = spec.resolved()
            if resolved.path != spec.path:
                check_model_folder(resolved.path, resolved.adapter, flag="the adapter's base model")
    except ValueError as exc:  # ModelFolderError is a ValueError too
        print(f"cellduality eval: error: {exc}", file=sys.stderr)
        return 2
    check_out_dir(args.out)
    if args.cell_eval:
        from cellduality.eval.cell_eval import available

        ok, why = available()
        if not ok:
            console.print(f"cellduality eval: error: --cell-eval: {why}")
            return 2
    if args.self_verify == 1 or args.self_verify < 0:
        print("cellduality eval: error: --self-verify needs N >= 2 samples (0 turns it off)", file=sys.stderr)
        return 2
    config = EvalConfig(
        out_dir=args.out,
        models=models,
        split=args.eval_split,
        tasks=args.tasks,
        max_examples=args.max_examples if args.prepared is not None else None,
        generation=GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
        ),
        self_verify=args.self_verify,
        self_verify_temperature=args.self_verify_temperature,
        baselines=not args.no_baselines,
        cache_dir=args.cache_dir,
        backend=args.backend,
        data_path=args.data,
        layer=args.layer,
        gene_symbols=args.gene_symbols,
        knn_k=args.knn_k,
        n_de=args.n_de,
        seed=args.seed,
        plots=not args.no_plots,
        progress=not args.no_progress,
        cell_eval=args.cell_eval,
    )
    if args.prepared is not None and len(args.prepared) > 1:
        if args.data is not None:
            print(
                "cellduality eval: error: --data names one file: evaluate one --prepared folder with it",
                file=sys.stderr,
            )
            return 2
        return _eval_several(console, args.prepared, config)
    real = None
    if args.prepared is not None:
        prepared = args.prepared[0]
    else:
        prepared, real = _build_examples(args)
    result = run_eval(prepared, config, real=real)
    _print_summary(console, result)
    return 0


def _eval_several(console, folders: list[Path], config) -> int:
    """One evaluation per prepared folder into OUT/<folder name>, and OUT/index.md linking them."""
    from cellduality.eval.runner import run_eval_many

    results = run_eval_many(folders, config)
    lines = ["# CellDuality evaluation", "", "| dataset | tasks | report |", "|---|---|---|"]
    for name, result in results.items():
        console.rule(name)
        _print_summary(console, result)
        lines.append(f"| {name} | {', '.join(result.tasks)} | [{name}/report.md]({name}/report.md) |")
    index = Path(config.out_dir) / "index.md"
    index.write_text("\n".join(lines) + "\n")
    console.print(saved_to("eval", config.out_dir, "index.md, one report per dataset"))
    return 0


def _build_examples(args: argparse.Namespace):
    """Examples built on the fly from ``--dataset`` (saved under OUT/prepared for later runs)."""
    from cellduality.cli_common import build_from_args
    from cellduality.tasks import save_prepared
    from cellduality.tasks.real_data import RealData

    data, prepared = build_from_args(args)
    save_prepared(prepared, Path(args.out) / "prepared")
    return prepared, RealData(data, prepared.meta)


def _print_summary(console, result) -> None:
    """One line per task and method with its headline metric, then where the report is."""
    from cellduality.eval.markdown import fmt
    from cellduality.eval.report import COLUMNS

    for task, res in result.tasks.items():
        key, title = COLUMNS[task][0]
        title = title.format(k=res.info.get("k", 3), n_de=res.info.get("n_de", 20))
        console.print(f"[bold]{task}[/bold] ({res.n_examples} examples) — {title}")
        for score in res.methods:
            valid = fmt(score.metrics.get("valid_output_rate"))
            console.print(f"  {score.name:<40} {fmt(score.metrics.get(key)):>8}   valid output {valid}")
    for warning in result.info.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    out = Path(result.files["report"]).parent
    console.print(
        saved_to("eval", out, f"{Path(result.files['report']).name}, {Path(result.files['metrics']).name}")
    )


__all__ = ["add_parser", "cmd_eval"]
