"""The ``cellduality eval`` subcommand: flags and handler (heavy imports happen inside the handler).

Register it with ``cellduality.eval.command.add_parser(subparsers)`` in ``cellduality/cli.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_CHOICES = ["annotation", "generation", "drug_sensitivity", "perturbation"]

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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--split", default="test", help="split of the prepared examples to evaluate (default test)"
    )
    p.add_argument(
        "--tasks", nargs="+", choices=TASK_CHOICES, help="tasks to evaluate (default: all present)"
    )
    p.add_argument("--max-examples", type=int, help="cap per task (seeded sample, the same for every model)")
    p.add_argument(
        "--data", help="the .h5ad the prepared examples came from, when it is not an embedded dataset"
    )
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM if usable")
    g.add_argument("--cache-dir", type=Path, help="completion cache (default OUT/cache)")
    g.add_argument(
        "--self-verify",
        type=int,
        default=0,
        metavar="N",
        help="also report: N sampled answers per example, keep the one whose dual task the model solves best",
    )
    g.add_argument("--self-verify-temperature", type=float, default=1.0)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("scoring")
    s.add_argument("--no-baselines", action="store_true")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--knn-k", type=int, default=3)
    s.add_argument("--n-de", type=int, default=20, help="top differentially expressed genes (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--cell-eval",
        action="store_true",
        help="also score perturbation predictions with cell-eval's MetricsEvaluator (needs the .[eval] extra)",
    )
    b = p.add_argument_group("--dataset: building examples (as `cellduality prepare`)")
    b.add_argument("--top-k", type=int, default=100)
    b.add_argument("--n-genes", type=int)
    b.add_argument("--split-mode", choices=["id", "ood"], default="id")
    b.add_argument("--test-fraction", type=float, default=0.2)
    b.add_argument("--holdout", nargs="+")
    c = p.add_argument_group("your own .h5ad: column names (as `cellduality prepare`)")
    c.add_argument("--cell-type-col")
    c.add_argument("--drug-col")
    c.add_argument("--response-col")
    c.add_argument("--sensitive-value", default="sensitive")
    c.add_argument("--resistant-value", default="resistant")
    c.add_argument("--perturbation-col")
    c.add_argument("--control-value", default="control")
    c.add_argument("--perturbation-kind", choices=["genetic", "chemical"], default="genetic")
    c.add_argument("--direction-col")
    c.add_argument("--default-direction", default="knockdown")
    c.add_argument("--dose-col")
    c.add_argument("--context-cols", nargs="+", default=())
    c.add_argument("--layer")
    c.add_argument("--gene-symbols")
    c.add_argument("--allow-scaled", action="store_true")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``cellduality eval``."""
    from rich.console import Console

    from cellduality.eval.generate import GenerationSettings, ModelSpec
    from cellduality.eval.runner import EvalConfig, run_eval

    console = Console(stderr=True)
    try:
        models = [ModelSpec.parse(text) for text in args.model]
    except ValueError as exc:
        console.print(f"cellduality eval: error: {exc}")
        return 2
    if args.cell_eval:
        from cellduality.eval.cell_eval import available

        ok, why = available()
        if not ok:
            console.print(f"cellduality eval: error: --cell-eval: {why}")
            return 2
    if args.self_verify == 1 or args.self_verify < 0:
        console.print("cellduality eval: error: --self-verify needs N >= 2 samples (0 turns it off)")
        return 2
    config = EvalConfig(
        out_dir=args.out,
        models=models,
        split=args.split,
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
            console.print(
                "cellduality eval: error: --data names one file: evaluate one --prepared folder with it"
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
    console.print(f"index: {index}")
    return 0


def _build_examples(args: argparse.Namespace):
    """Examples built on the fly from ``--dataset`` (saved under OUT/prepared for later runs)."""
    from cellduality.cli import _columns_from_args
    from cellduality.data import load_dataset
    from cellduality.eval.scoring import RealData
    from cellduality.tasks import TaskConfig, build_tasks, save_prepared

    data = load_dataset(
        args.dataset,
        _columns_from_args(args),
        layer=args.layer,
        gene_symbols=args.gene_symbols,
        allow_scaled=True if args.allow_scaled else None,
    )
    cfg = TaskConfig(top_k=args.top_k, n_genes=args.n_genes, max_examples=args.max_examples, seed=args.seed)
    prepared = build_tasks(
        data,
        args.tasks,
        split=args.split_mode,
        config=cfg,
        test_fraction=args.test_fraction,
        holdout=args.holdout,
    )
    save_prepared(prepared, Path(args.out) / "prepared")
    return prepared, RealData(data, prepared.meta)


def _print_summary(console, result) -> None:
    """One line per task and method with its headline metric, then where the report is."""
    from cellduality.eval.report import COLUMNS, fmt

    for task, res in result.tasks.items():
        key, title = COLUMNS[task][0]
        title = title.format(k=res.info.get("k", 3), n_de=res.info.get("n_de", 20))
        console.print(f"[bold]{task}[/bold] ({res.n_examples} examples) — {title}")
        for score in res.methods:
            valid = fmt(score.metrics.get("valid_output_rate"))
            console.print(f"  {score.name:<40} {fmt(score.metrics.get(key)):>8}   valid output {valid}")
    console.print(f"report: {result.files['report']}  metrics: {result.files['metrics']}")


__all__ = ["add_parser", "cmd_eval"]
