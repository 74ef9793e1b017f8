"""The ``cellduality dual-check`` subcommand: argument parsing and the printed verdicts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dual-check",
        help="validate the dual reward: does it score right forward answers above wrong ones?",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint folder (the policy that answers the duals)")
    p.add_argument("--prepared", nargs="+", required=True, type=Path, help="prepared folders")
    p.add_argument("--out", required=True, type=Path, help="folder for dual_check.json and dual_check.md")
    p.add_argument("--split", nargs="+", default=["test"], help="splits to check")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to check (default: all present)")
    p.add_argument("--max-rows", type=int, default=60, help="examples per task and split (seeded sample)")
    p.add_argument("--group-size", type=int, default=4, help="G, sampled forward answers per prompt")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature of the forward answers"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per forward or dual answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default="hf", choices=["auto", "hf", "vllm"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_dual_check)
    return p


def cmd_dual_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cellduality.data.schema import DataError
    from cellduality.eval.dual_check import DualCheckConfig, run_dual_check

    if not (Path(args.model) / "config.json").is_file():
        raise DataError(f"{args.model} holds no model (no config.json); give a checkpoint folder")
    if args.max_rows < 1 or args.group_size < 1:
        raise DataError("--max-rows and --group-size must be at least 1")
    config = DualCheckConfig(
        splits=tuple(args.split),
        tasks=args.tasks,
        max_rows=args.max_rows,
        group_size=args.group_size,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    checks = run_dual_check(args.model, args.prepared, config, out_dir=args.out, backend=args.backend)
    console = Console()
    table = Table(title="dual-check: right vs wrong forward answers")
    for col in ("dataset", "task", "wrong answer", "right", "wrong", "gap [95% CI]", "verdict"):
        table.add_column(col)
    for c in checks:
        for g in c.gaps:
            table.add_row(
                c.dataset,
                c.task,
                g.wrong_kind,
                f"{g.right:.3f}",
                f"{g.wrong:.3f}",
                f"{g.gap:+.3f} [{g.ci_low:+.3f}, {g.ci_high:+.3f}]",
                c.verdict if g is c.gaps[0] else "",
            )
    console.print(table)
    console.print(f"saved to {args.out / 'dual_check.md'} and {args.out / 'dual_check.json'}")
    return 0 if all(c.carries_signal for c in checks) else 1
