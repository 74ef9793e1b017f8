"""``cellduality demo``: the whole idea on embedded real cells, on a laptop CPU, offline.

prepare -> offline-teacher SFT data (with dual examples) -> SFT -> self-supervised dual GRPO ->
evaluation of the SFT and GRPO checkpoints next to the baselines -> one report folder.

Data: ``pbmc68k`` (annotation, conditional generation), ``scad_plx4720`` (drug sensitivity),
``glioblastoma_panobinostat`` (chemical perturbation response: the embedded perturbation data whose dual
carries signal; on the genetic screens in ``norman_devel`` a reader fitted on the training labels names
a perturbation from a cell barely better than chance at this size, see ``cellduality dual-check``). The model is the tiny offline Llama. The
full demo uses the paper's data design: 64 labelled cells per task for the teacher and SFT, dual GRPO
on the disjoint unlabelled RL pool (``FULL``). ``--quick`` shrinks every stage (a smoke run in about 2
minutes); ``docs/quickstart.md`` has a measured run. The same seed gives the same numbers on one
machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cellduality.eval.headline import HEADLINE_METRICS, headline_markdown, headline_rows

DEMO_DATASETS = ("pbmc68k", "scad_plx4720", "glioblastoma_panobinostat")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of every stage; ``FULL`` and ``QUICK`` are the two the command offers."""

    top_k: int
    max_examples: int  # per task and split, when building the examples
    sft_limit: int  # forward examples per task given to the offline teacher
    sft_epochs: float
    hidden_size: int
    num_layers: int
    grpo_steps: int
    grpo_batch: int  # completions per step (prompts x num_generations)
    eval_examples: int | None  # test examples per task (None: all)
    check_rows: int = 60  # test examples per task for the dual check
    check_group: int = 4  # sampled forward answers per prompt in the dual check (GRPO's G)
    grpo_lr: float = 3e-5
    grpo_generations: int = 4  # completions per prompt (GRPO's G); grpo_batch / G prompts per step
    # the paper's data design: labelled cells per task in the SFT set, the rest of the training split is
    # the RL pool (GRPO's prompts), capped at ``rl_examples`` prompt cells per task; None: no RL pool
    sft_examples: int | None = None
    rl_examples: int | None = None
    grpo_schedule: str = "linear"  # GRPO's learning-rate schedule (transformers' lr_scheduler_type)
    oracle_reward: str = "oracle"  # the oracle arm's reward (oracle_eval: what eval scores)
    eval_sampled: bool = False  # also evaluate sampled answers (T = 1, GRPO's own temperature)
    # tasks whose dual the SFT checkpoint answers, frozen, in dual GRPO (the others: the policy itself)
    dual_frozen_tasks: tuple[str, ...] = ()


# the paper's data design (docs/results.md): 64 labelled cells per task for SFT (20 epochs, about 480
# optimizer steps), dual GRPO on the disjoint RL pool (96 prompt cells per task), 320 steps at a
# constant lr 1e-4 after warm-up, 8 completions per prompt; the SFT checkpoint, frozen, answers the
# classification tasks' in-painting duals, the policy the generation tasks' (docs/results.md: chosen on
# seed 0's training rewards): the ablation's SFT and dual arm, seed 0
FULL = DemoPlan(
    16,
    400,
    250,
    20,
    128,
    4,
    320,
    32,
    120,
    check_group=8,
    grpo_lr=1e-4,
    grpo_generations=8,
    sft_examples=64,
    rl_examples=96,
    grpo_schedule="constant_with_warmup",
    dual_frozen_tasks=("annotation", "drug_sensitivity"),
)
QUICK = DemoPlan(12, 60, 60, 6, 128, 4, 6, 8, 24, check_rows=12, check_group=2)


class Stages:
    """Prints each stage's start and end with its duration, and keeps the timings for the report."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.console.rule(f"[bold]{name}[/bold]: {what}")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.console.print(f"[green]{name} done in {self.timings[name]:.0f} s")


def _prepare(
    out: Path, plan: DemoPlan, seed: int, console: Console, splits: dict[str, str] | None = None
) -> list[Path]:
    """The embedded datasets' examples; ``splits`` names the datasets to split OOD (default: all ID)."""
    from cellduality.data import load_dataset
    from cellduality.reporting import print_prepared
    from cellduality.tasks import TaskConfig, build_tasks, save_prepared

    folders = []
    for name in DEMO_DATASETS:
        cfg = TaskConfig(
            top_k=plan.top_k,
            max_examples=plan.max_examples,
            seed=seed,
            sft_examples=plan.sft_examples,
            rl_examples=plan.rl_examples,
        )
        prepared = build_tasks(load_dataset(name), config=cfg, split=(splits or {}).get(name, "id"))
        folder = save_prepared(prepared, out / "prepared" / name)
        print_prepared(prepared, folder, console)
        folders.append(folder)
    return folders


def _common_train_args(seed: int) -> dict[str, Any]:
    return {
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "disable_tqdm": False,
    }


def _sft(out: Path, folders: list[Path], plan: DemoPlan, seed: int, name: str = "sft", **overrides: Any):
    """SFT into ``out/<name>``; ``overrides`` replace SFTConfig fields (the allocator benchmark's
    ``max_steps``), every other setting is the demo's."""
    from trl import ModelConfig, SFTConfig

    from cellduality.train.configs import CellDualityArguments, SFTDataArguments
    from cellduality.train.sft import run_sft

    cd = CellDualityArguments(
        dataset=[str(f) for f in folders],
        build_tiny_model=True,
        tiny_hidden_size=plan.hidden_size,
        tiny_num_layers=plan.num_layers,
        tiny_seen_genes_only=True,
        prepared_dir=str(out / "train_prepared"),
    )
    data = SFTDataArguments(sft_data=str(out / "sft_data"), sft_limit=plan.sft_limit, sft_concise=True)
    settings: dict[str, Any] = {
        "num_train_epochs": plan.sft_epochs,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "per_device_train_batch_size": 32,
        "max_length": 512,
        "logging_steps": 10,
        "save_strategy": "no",
        **_common_train_args(seed),
    }
    args = SFTConfig(output_dir=str(out / name), **{**settings, **overrides})
    model = ModelConfig(model_name_or_path=str(out / "model"), dtype="float32")
    return run_sft(cd, data, args, model)


def _grpo(out: Path, folders: list[Path], plan: DemoPlan, seed: int, mode: str = "dual", name: str = "grpo"):
    """GRPO from ``out/sft`` into ``out/<name>``: self-supervised dual rewards, or (``mode='oracle'``) the
    ground-truth rewards of the ablation, with every other setting the same."""
    from trl import GRPOConfig, ModelConfig

    from cellduality.train.configs import CellDualityArguments
    from cellduality.train.grpo import run_grpo

    cd = CellDualityArguments(
        dataset=[str(f) for f in folders],
        reward_mode="self_supervised" if mode == "dual" else "oracle",
        reward_funcs=["format", "dual"] if mode == "dual" else ["format", plan.oracle_reward],
        dual_max_new_tokens=2 * plan.top_k + 8,
        prepared_dir=str(out / "train_prepared"),
        monitor_rows=8,
        monitor_steps=max(1, plan.grpo_steps // 3),
        dual_frozen_tasks=list(plan.dual_frozen_tasks),
    )
    args = GRPOConfig(
        output_dir=str(out / name),
        max_steps=plan.grpo_steps,
        learning_rate=plan.grpo_lr,
        lr_scheduler_type=plan.grpo_schedule,
        warmup_steps=min(5, plan.grpo_steps // 10) if plan.grpo_schedule != "linear" else 0,
        beta=0.0,
        num_generations=plan.grpo_generations,
        per_device_train_batch_size=plan.grpo_batch,
        max_completion_length=2 * plan.top_k + 8,
        temperature=1.0,
        reward_weights=[0.2, 1.0],
        logging_steps=1,
        save_strategy="no",
        log_completions=False,
        # issue 21: the rollouts' KV cache allocated once per generation instead of grown token by token
        # (the same samples; 6-10% more tokens per CPU second on the demo's GRPO, benchmarks/train_speed.py)
        cache_implementation="static",
        **_common_train_args(seed),
    )
    model = ModelConfig(model_name_or_path=str(out / "sft"), dtype="float32")
    return run_grpo(cd, args, model)


ALL_TASKS = "all tasks"


def dual_reward_curves(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Per task, the dual reward logged at each GRPO step (``dual/<task>/reward``), and over all tasks
    (``rewards/dual/mean``, TRL's batch mean) under ``ALL_TASKS``."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            if key.startswith("dual/") and key.endswith("/reward"):
                curves.setdefault(key.split("/")[1], []).append((int(entry["step"]), float(value)))
            elif key == "rewards/dual/mean":
                curves.setdefault(ALL_TASKS, []).append((int(entry["step"]), float(value)))
    return curves


def monitor_series(log_history: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per task and figure (spearman, dual_gap, oracle), the monitor split's values at each check."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "monitor" and "step" in entry and value is not None:
                out.setdefault(parts[1], {}).setdefault(parts[2], []).append(
                    (int(entry["step"]), float(value))
                )
    return out


def trend(points: list[tuple[int, float]]) -> dict[str, float]:
    """Mean of the first and last thirds of a curve, and their difference (positive = rising)."""
    values = [v for _, v in points]
    if len(values) < 3:
        return {"first": float("nan"), "last": float("nan"), "rise": float("nan")}
    third = max(1, len(values) // 3)
    first = sum(values[:third]) / third
    last = sum(values[-third:]) / third
    return {"first": first, "last": last, "rise": last - first}


def plot_dual_rewards(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Dual reward per task over GRPO steps, one panel per task on shared axes (none hides another)."""
    from cellduality.eval.plots import plot_reward_curves

    plot_reward_curves(curves, path)


def _evaluate(out: Path, folders: list[Path], plan: DemoPlan, seed: int) -> dict[str, Any]:
    return _evaluate_models(out, folders, plan, seed, [("SFT", "sft"), ("dual GRPO", "grpo")])


def _evaluate_models(
    out: Path,
    folders: list[Path],
    plan: DemoPlan,
    seed: int,
    models: list[tuple[str, str]],
    temperature: float = 0.0,
    report: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoints ``out/<folder>`` (as ``name``) next to the baselines, into ``report``
    (default ``out/report``); ``temperature`` > 0 scores sampled answers (seeded) instead of greedy ones."""
    from cellduality.eval.generate import GenerationSettings, ModelSpec
    from cellduality.eval.runner import EvalConfig, run_eval_many

    config = EvalConfig(
        out_dir=report or out / "report",
        models=[ModelSpec(str(out / folder), name=name) for name, folder in models],
        max_examples=plan.eval_examples,
        generation=GenerationSettings(
            max_new_tokens=2 * plan.top_k + 8, batch_size=32, seed=seed, temperature=temperature
        ),
        cache_dir=out / "eval_cache",
        backend="hf",
        seed=seed,
    )
    return run_eval_many(folders, config)


def _dual_check(out: Path, folders: list[Path], plan: DemoPlan, seed: int) -> dict[str, Any]:
    """The dual reward's own validation on the SFT and the GRPO checkpoints (``cellduality dual-check``)."""
    from cellduality.eval.dual_check import DualCheckConfig, run_dual_check

    config = DualCheckConfig(
        max_rows=plan.check_rows,
        group_size=plan.check_group,
        max_new_tokens=2 * plan.top_k + 8,
        seed=seed,
    )
    return {
        name: run_dual_check(
            str(out / folder), folders, config, out_dir=out / "report" / "dual_check" / folder
        )
        for name, folder in (("SFT", "sft"), ("dual GRPO", "grpo"))
    }


# task -> headline metrics (friendly names, accuracy with macro-F1, Pearson Δ on DE and on all genes);
# each row shows the simplest and the strongest baseline and says when a baseline wins
HEADLINE = HEADLINE_METRICS
MODELS = ("SFT", "dual GRPO")


def _headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task and headline metric: SFT, dual GRPO, the simplest and the strongest baseline, a verdict."""
    return headline_rows(results)


def _fmt(value: Any) -> str:
    return "—" if value is None or value != value else f"{value:.3f}"


#: measured reasons a dual cannot carry signal on an embedded dataset (docs/contracts.md has the numbers)
KNOWN_REASONS = {
    "scad_plx4720/drug_sensitivity": "SCAD's matrix is per-gene z-scores, so a cell's top genes are its "
    "outliers: no gene is in more than 3% of the 16-gene training sentences, so no label can predict the "
    "hidden ones (even an ideal label-reading policy scores 0.000). A counts-based drug screen (GSE117872, "
    "GSE110894, GSE149383 read by `prepare`) is the data this dual needs.",
    "norman_devel/perturbation": "the perturbation targets are not among norman_devel's 500 genes, so a "
    "16-gene sentence shows a perturbation only through downstream changes; the dual check's data bound "
    "(a reader fitted on the training labels) is near chance at the demo's size.",
    "norman2019_k562/perturbation": "the CRISPRa targets are not among the 500 genes; the dual check's data "
    "bound (a reader fitted on 400 training cells) names the perturbation 0.28 vs 0.10-0.15: the tiny "
    "policy does not learn that weak a signal in a demo's SFT.",
}


def _check_imports():
    from cellduality.eval.dual_check import markdown_table, to_json

    return markdown_table, to_json


def _write_report(
    out: Path,
    results: dict[str, Any],
    curves: dict[str, list[tuple[int, float]]],
    timings: dict[str, float],
    plan: DemoPlan,
    quick: bool,
    seed: int,
    checks: dict[str, Any] | None = None,
    monitor: dict[str, dict[str, list[tuple[int, float]]]] | None = None,
) -> Path:
    markdown_table, to_json = _check_imports()
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_dual_rewards(curves, report / "dual_rewards.png")
    trends = {task: trend(points) for task, points in curves.items()}
    headline = _headline(results)
    metrics = {
        "mode": "quick" if quick else "full",
        "seed": seed,
        "plan": plan.__dict__,
        "timings_s": timings,
        "headline": headline,
        "grpo_dual_reward": {"curves": curves, "trend": trends},
        "dual_check": {name: to_json(c) for name, c in (checks or {}).items()},
        "monitor": monitor or {},
        "datasets": {name: json.loads((report / name / "metrics.json").read_text()) for name in results},
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    lines = [
        "# CellDuality demo report",
        "",
        f"Mode **{metrics['mode']}**, seed {seed}. A tiny Llama ({plan.hidden_size} wide, {plan.num_layers} "
        f"layers) was fine-tuned on offline-teacher traces (SFT), then trained with self-supervised dual GRPO "
        f"({plan.grpo_steps} steps, rewards: format + dual, no labels). Cell sentences have {plan.top_k} "
        "genes. Every number below is on held-out test cells.",
        "",
        "## Headline",
        "",
        "↑: higher is better. *Simplest baseline*: the floor (majority class, class-mean sentence, the "
        "control cell unchanged); *strongest baseline*: the best of all baselines on that metric, the bar "
        "a model has to clear.",
        "",
        *headline_markdown(headline, MODELS),
    ]
    lines += [
        "",
        "## Dual reward during GRPO",
        "",
        "The dual reward is what GRPO optimised: for annotation and drug sensitivity, how well the policy "
        "in-paints hidden genes given its own predicted label (RWJS); for generation and perturbation, "
        "whether it recognises the condition of the cell it generated (1/0). First and last third of the "
        "steps:",
        "",
        "| task | first third | last third | change |",
        "|---|---|---|---|",
    ]
    for task, t in sorted(trends.items()):
        lines.append(f"| {task} | {_fmt(t['first'])} | {_fmt(t['last'])} | {t['rise']:+.3f} |")
    lines += ["", "![dual reward over GRPO steps](dual_rewards.png)", ""]
    if monitor:
        lines += [
            "### Monitor split: does the dual reward still agree with the truth?",
            "",
            "8 labelled rows per task (from the SFT set when GRPO trains on an RL pool: the pool's labels stay "
            "unread; otherwise held out of GRPO's rows); at each check G sampled answers per prompt "
            "are scored by the dual reward and by the oracle (labels read by the monitor only). Spearman of "
            "the two inside groups, and the dual reward of the better minus the worse answers; first and "
            "last check:",
            "",
            "| task | Spearman(dual, oracle) | dual gap, better − worse | oracle reward |",
            "|---|---|---|---|",
        ]

        def first_last(points: list[tuple[int, float]] | None) -> str:
            if not points:
                return "—"
            return f"{points[0][1]:+.3f} → {points[-1][1]:+.3f} (steps {points[0][0]}–{points[-1][0]})"

        for task, figures in sorted(monitor.items()):
            lines.append(
                f"| {task} | {first_last(figures.get('spearman'))} | {first_last(figures.get('dual_gap'))} | "
                f"{first_last(figures.get('oracle'))} |"
            )
        lines.append("")
    if checks:
        lines += [
            "## Does the dual reward tell right from wrong? (`cellduality dual-check`)",
            "",
            "For each test example, the dual reward the checkpoint gives a *right* forward answer (the true "
            "label, a real cell of the prompted condition) and a *wrong* one (another candidate, a real cell "
            "of another condition, the unchanged control cell); then, as GRPO sees it, G sampled answers per "
            "prompt. A dual whose gap's 95% interval does not lie above 0 teaches GRPO nothing.",
            "",
        ]
        failing = sorted({f"{c.dataset}/{c.task}" for c in checks.get("SFT", []) if not c.carries_signal})
        if failing:
            lines += [f"**Flagged: no dual signal on the SFT checkpoint for {', '.join(failing)}.**", ""]
            lines += [f"- {name}: {KNOWN_REASONS[name]}" for name in failing if name in KNOWN_REASONS]
            lines += [""]
        for name, c in checks.items():
            lines += [*markdown_table(c, title=f"{name} checkpoint"), ""]
    lines += [
        "Does dual GRPO help, beyond one seed? `cellduality ablation` (or `make ablation`) runs SFT, dual GRPO "
        "and oracle GRPO from the same SFT checkpoint over three seeds, with intervals and the share of the "
        "SFT → oracle gap dual GRPO closes (a measured run: docs/results.md).",
        "",
        "## Full tables per dataset",
        "",
    ]
    for name in results:
        lines.append(f"- [{name}]({name}/report.md): every metric, every baseline, plots")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return report


def run_demo(out: Path = Path("demo_out"), quick: bool = False, seed: int = 0) -> Path:
    """Run every stage; return the report folder."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    console = Console()
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(console)
    with stages.stage("1/6 prepare", "cell sentences and task examples from embedded real data"):
        folders = _prepare(out, plan, seed, console)
    with stages.stage("2/6 SFT", "offline-teacher traces (forward + dual) -> supervised fine-tuning"):
        _sft(out, folders, plan, seed)
    with stages.stage("3/6 dual GRPO", "self-supervised rewards from the dual tasks, no labels"):
        grpo = _grpo(out, folders, plan, seed)
    with stages.stage("4/6 eval", "SFT and dual GRPO against baselines on held-out cells"):
        results = _evaluate(out, folders, plan, seed)
    with stages.stage("5/6 dual check", "does each dual reward score right answers above wrong ones?"):
        checks = _dual_check(out, folders, plan, seed)
    with stages.stage("6/6 report", "tables and plots"):
        curves = dual_reward_curves(grpo.state.log_history)
        monitor = monitor_series(grpo.state.log_history)
        report = _write_report(out, results, curves, stages.timings, plan, quick, seed, checks, monitor)
    table = Table(title="CellDuality demo: headline (held-out cells)")
    for col in ("task", "metric", *MODELS, "simplest baseline", "strongest baseline"):
        table.add_column(col)
    headline = _headline(results)
    for r in headline:
        table.add_row(
            r["task"],
            r["metric"],
            *[_fmt(r.get(m)) for m in MODELS],
            f"{r['baseline']} {_fmt(r['baseline value'])}",
            f"{r['strongest baseline']} {_fmt(r['strongest value'])}",
        )
    console.print(table)
    # the verdicts are sentences: a seventh column squeezes every column to a few characters in an
    # 80-column terminal, so they follow the table, one line per task
    for r in headline:
        console.print(f"  [bold]{r['task']}[/bold]: {r['verdict']}")
    console.print(f"[bold green]Report: {report / 'report.md'}")
    from cellduality.cli_common import saved_to

    console.print(saved_to("demo", out, "prepared/, sft/, grpo/, report/"))
    return report
