"""The ``cellduality sft-data`` subcommand (also ``python sft_data/generate.py``): flags and handler.

Register it with ``cellduality.teacher.command.add_parser(subparsers)`` in ``cellduality/cli.py``.
Module-level imports are the standard library only, so ``cellduality --help`` stays instant; the
engine (``cellduality.teacher.pipeline``) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellduality.cli_common import TASK_CHOICES, HelpFormatter, add_sentence_args, add_split_args

NO_KEY = ("", "none")

EPILOG = """\
examples:
  # offline teacher (no endpoint): grounded rationales from the training split, no network
  cellduality sft-data --data prepared/pbmc68k --out sft_data/offline

  # a hosted teacher; the key is read from the variable named by --api-key-env, never written
  export OPENAI_API_KEY=...
  cellduality sft-data --data prepared/pbmc68k prepared/norman --out sft_data/run1 \\
      --teacher-base-url https://api.openai.com/v1 --teacher-model gpt-4o \\
      --concurrency 32 --max-attempts 4 --price-in 2.5 --price-out 10

  # two teachers mixed 3:1 on a local vLLM server that needs no key
  cellduality sft-data --data pbmc68k --out sft_data/mix --teacher-base-url http://localhost:8000/v1 \\
      --teacher-model big --teacher-weight 3 --teacher-model small --teacher-weight 1 --api-key-env none

Killed or interrupted? Run the same command again: finished examples are skipped, nothing is asked twice.
"""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sft-data flags to ``p`` (shared by the subcommand and ``sft_data/generate.py``)."""
    p.add_argument(
        "--data",
        nargs="+",
        action="extend",
        required=True,
        metavar="SRC",
        help="prepared folder(s) (cellduality prepare) or embedded dataset name(s); only the train split "
        "is used",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (attempts, dataset, summary)")
    p.add_argument("--tasks", nargs="+", choices=TASK_CHOICES, help="tasks to use (default: all present)")
    p.add_argument("--limit", type=int, help="forward examples per task (seeded choice; default: all)")
    p.add_argument("--seed", type=int, default=0, help="example choice, teacher mixture, retry jitter")
    p.add_argument("--no-duals", action="store_true", help="forward examples only")
    p.add_argument(
        "--counterfactuals",
        type=int,
        default=1,
        help="counterfactual dual examples per forward example (a wrong forward answer, answered right; "
        "they make the policy read its forward answer): 0 turns them off",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--offline-concise",
        action="store_true",
        help="offline teacher: short, formulaic rationales (for tiny models trained on a CPU)",
    )

    t = p.add_argument_group("teacher (none given: the offline teacher)")
    t.add_argument(
        "--teacher-base-url",
        action="append",
        default=[],
        metavar="URL",
        help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1; once for all models, or once "
        "per --teacher-model",
    )
    t.add_argument(
        "--teacher-model", action="append", default=[], metavar="NAME", help="teacher model; repeat to mix"
    )
    t.add_argument(
        "--teacher-weight",
        action="append",
        type=float,
        default=[],
        metavar="W",
        help="share of each --teacher-model (default: equal)",
    )
    t.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="name of the environment variable holding the API key (default OPENAI_API_KEY; 'none' for a "
        "server that needs no key). The key itself is never written anywhere",
    )
    t.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    t.add_argument(
        "--max-attempts",
        type=int,
        default=4,
        help="teacher answers tried per example before it is rejected (default 4)",
    )
    t.add_argument(
        "--rwjs-threshold",
        type=float,
        default=None,
        help="minimum RWJS for gene-list answers (default 0.3; see sft_data/README.md)",
    )
    t.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="sampling temperature (default 0.7; > 0 so that a retry can give a different answer)",
    )
    t.add_argument("--max-tokens", type=int, default=2048, help="max tokens per teacher reply")
    t.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="total seconds one HTTP request may take (generous: long reasoning replies take minutes)",
    )
    t.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to open a connection")
    t.add_argument(
        "--first-byte-timeout",
        type=float,
        default=30.0,
        help="seconds without a reply before the endpoint is checked (GET /models): one that does not "
        "answer that either is dead, and the run stops with the same message as for a server that is down",
    )
    t.add_argument("--probe-timeout", type=float, default=10.0, help="seconds the liveness check waits")
    t.add_argument("--max-tries", type=int, default=5, help="HTTP tries per request (429/5xx/timeouts)")
    t.add_argument(
        "--max-retry-wait",
        type=float,
        default=120.0,
        metavar="S",
        help="longest single wait before a retry; a server asking (Retry-After) for longer stops the run at once "
        "with a verdict (rate-limited), instead of waiting",
    )
    t.add_argument(
        "--max-retry-total",
        type=float,
        default=300.0,
        metavar="S",
        help="most seconds one request may spend waiting between its tries, all waits together",
    )
    t.add_argument(
        "--price-in",
        action="append",
        type=float,
        default=[],
        metavar="USD",
        help="USD per million prompt tokens (once, or once per model): summary.json estimates the cost",
    )
    t.add_argument(
        "--price-out",
        action="append",
        type=float,
        default=[],
        metavar="USD",
        help="USD per million completion tokens",
    )

    b = p.add_argument_group("embedded dataset names in --data: how to build their examples")
    add_sentence_args(b)
    add_split_args(b, holdout=False, test_fraction=False)
    return p


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sft-data`` subcommand to ``cellduality``'s subparsers and return its parser."""
    p = subparsers.add_parser(
        "sft-data",
        help="distil teacher reasoning traces (forward + dual examples) into an SFT dataset",
        description=(
            "Ask a teacher (an OpenAI-compatible endpoint, or the offline teacher) for <think>/<answer> traces "
            "on the training examples and their dual tasks, keep the ones whose answers check out, and write "
            "OUT/dataset (for cellduality.train.sft), OUT/attempts.jsonl and OUT/summary.json."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_sft_data)
    return p


def _per_model(values: list[Any], n: int, flag: str) -> list[Any]:
    """One value for every model, or one per model."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"give {flag} once, or once per --teacher-model ({n}); got {len(values)}")
    return values


def endpoints_from_args(args: argparse.Namespace) -> list[Any]:
    """``TeacherEndpoint``s from the flags; an empty list means the offline teacher."""
    from cellduality.teacher.client import TeacherEndpoint

    models: list[str] = list(args.teacher_model)
    if not models:
        if args.teacher_base_url or args.teacher_weight:
            raise ValueError("--teacher-base-url / --teacher-weight need at least one --teacher-model")
        return []
    if not args.teacher_base_url:
        raise ValueError("--teacher-model needs --teacher-base-url (an OpenAI-compatible endpoint)")
    n = len(models)
    urls = _per_model(list(args.teacher_base_url), n, "--teacher-base-url")
    weights = (
        _per_model(list(args.teacher_weight), n, "--teacher-weight") if args.teacher_weight else [1.0] * n
    )
    if bool(args.price_in) != bool(args.price_out):
        raise ValueError("give both --price-in and --price-out (USD per million tokens), or neither")
    prices_in = _per_model(list(args.price_in), n, "--price-in") if args.price_in else [None] * n
    prices_out = _per_model(list(args.price_out), n, "--price-out") if args.price_out else [None] * n
    key_env = None if args.api_key_env.strip().lower() in NO_KEY else args.api_key_env.strip()
    return [
        TeacherEndpoint(
            base_url=url,
            model=model,
            weight=weight,
            api_key_env=key_env,
            price_in_per_mtok=price_in,
            price_out_per_mtok=price_out,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            connect_timeout_s=args.connect_timeout,
            first_byte_timeout_s=args.first_byte_timeout,
            probe_timeout_s=args.probe_timeout,
        )
        for url, model, weight, price_in, price_out in zip(
            urls, models, weights, prices_in, prices_out, strict=True
        )
    ]


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``GenerationConfig`` the flags describe (raises ``ValueError`` on inconsistent flags)."""
    from cellduality.teacher.client import RetryPolicy
    from cellduality.teacher.filters import DEFAULT_RWJS_THRESHOLD
    from cellduality.teacher.pipeline import GenerationConfig

    teachers = endpoints_from_args(args)
    if teachers and args.temperature <= 0 and args.max_attempts > 1:
        logging.getLogger(__name__).warning(
            "--temperature %s with --max-attempts %d: a retry will most likely repeat the rejected answer",
            args.temperature,
            args.max_attempts,
        )
    return GenerationConfig(
        data=list(args.data),
        out=args.out,
        tasks=args.tasks,
        limit=args.limit,
        seed=args.seed,
        teachers=teachers,
        concurrency=args.concurrency,
        max_attempts=args.max_attempts,
        rwjs_threshold=DEFAULT_RWJS_THRESHOLD if args.rwjs_threshold is None else args.rwjs_threshold,
        duals=not args.no_duals,
        counterfactuals=args.counterfactuals,
        retry=RetryPolicy(
            max_tries=args.max_tries,
            retry_after_cap_s=args.max_retry_wait,
            max_wait_total_s=args.max_retry_total,
        ),
        top_k=args.top_k,
        n_genes=args.n_genes,
        split=args.split,
        progress=not args.no_progress,
        offline_concise=args.offline_concise,
    )


def print_summary(summary: dict[str, Any], out: Path) -> None:
    """A short table of what was kept and why the rest was not, on stderr."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"SFT data in {out}", show_lines=False)
    for column in ("task", "kind", "examples", "kept", "rejected (reason: n)", "failed", "pending"):
        table.add_column(column)
    for task, kinds in summary["tasks"].items():
        for kind, entry in kinds.items():
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(entry["rejected"].items())) or "-"
            failed = ", ".join(f"{k}: {v}" for k, v in sorted(entry["failed"].items())) or "-"
            table.add_row(
                task, kind, str(entry["examples"]), str(entry["kept"]), reasons, failed, str(entry["pending"])
            )
    console.print(table)
    tokens = summary["tokens"]["total"]
    cost = summary.get("cost_usd")
    line = f"tokens: {tokens:,}" + (f", estimated cost: ${cost:,.4f}" if cost is not None else "")
    dataset = summary.get("dataset")
    if dataset:
        line += (
            f"; dataset: {out / dataset['path']} ({dataset['forward']} forward + {dataset['dual']} dual rows)"
        )
    console.print(line)
    from cellduality.cli_common import saved_to

    console.print(saved_to("sft-data", out, "dataset/, attempts.jsonl, summary.json"))


def cmd_sft_data(args: argparse.Namespace) -> int:
    """Handler of ``cellduality sft-data``: exit 0 done, 1 teacher unavailable, 2 bad input, 130 interrupted."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from cellduality.data.schema import DataError
    from cellduality.teacher.client import TeacherConfigError
    from cellduality.teacher.pipeline import TeacherUnavailableError, run_generation
    from cellduality.teacher.store import StoreLockedError

    prog = "cellduality sft-data"
    try:
        config = config_from_args(args)
    except ValueError as exc:  # inconsistent flags (TeacherConfigError is one too)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_generation(config)
    except (DataError, TeacherConfigError, StoreLockedError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except TeacherUnavailableError as exc:
        print(f"{prog}: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted; what was generated is in {args.out}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    print_summary(summary, Path(args.out))
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Stand-alone entry point (``python sft_data/generate.py``): the same flags as the subcommand."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Distil teacher reasoning traces into an SFT dataset (same as `cellduality sft-data`).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    return cmd_sft_data(parser.parse_args(argv))


__all__ = ["add_arguments", "add_parser", "cmd_sft_data", "config_from_args", "endpoints_from_args", "main"]
