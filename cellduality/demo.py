"""``cellduality demo``: the whole idea on embedded real cells, on a laptop CPU, offline.

prepare -> offline-teacher SFT data (with dual examples) -> SFT -> self-supervised dual GRPO ->
evaluation of the SFT and GRPO checkpoints next to the baselines -> dual check -> one report folder.
Each stage is :mod:`cellduality.stages`' function of that name; every size and setting is in the plan's
recipes, ``recipes/demo/full/*.yaml`` (``FULL``, the default) or ``recipes/demo/quick/*.yaml``
(``--quick``: every stage shrunk, a smoke run of a few minutes), or a folder of one's own
(``--recipes``). ``docs/quickstart.md`` has a measured run.

Data (``prepare.yaml``): ``pbmc68k`` (annotation, conditional generation), ``scad_plx4720`` (drug
sensitivity), ``glioblastoma_panobinostat`` (chemical perturbation response: the embedded perturbation
data whose dual carries signal; on the genetic screens in ``norman_devel`` a reader fitted on the
training labels names a perturbation from a cell barely better than chance at this size, see
``cellduality dual-check``). The model is the tiny offline Llama. The full demo uses the paper's data
design: 64 labelled cells per task for the teacher and SFT, dual GRPO on the disjoint unlabelled RL
pool. The same seed gives the same numbers on one machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cellduality import stages
from cellduality.eval.headline import HEADLINE_METRICS, headline_markdown, headline_rows
from cellduality.stages import RECIPES, Plan

#: the two packaged plans ``cellduality demo`` offers: recipes/demo/full (the default) and --quick's
FULL = Plan(RECIPES / "demo" / "full")
QUICK = Plan(RECIPES / "demo" / "quick")


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
    plan: Plan,
    mode: str,
    seed: int,
    checks: dict[str, Any] | None = None,
    monitor: dict[str, dict[str, list[tuple[int, float]]]] | None = None,
) -> Path:
    markdown_table, to_json = _check_imports()
    sft, grpo, prepare = (plan.fields(stage) for stage in ("sft", "grpo_dual", "prepare"))
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_dual_rewards(curves, report / "dual_rewards.png")
    trends = {task: trend(points) for task, points in curves.items()}
    headline = _headline(results)
    metrics = {
        "mode": mode,
        "seed": seed,
        "recipes": plan.label,
        "plan": plan.record(),
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
        f"Mode **{metrics['mode']}**, seed {seed}. A tiny Llama ({sft.get('tiny_hidden_size')} wide, "
        f"{sft.get('tiny_num_layers')} layers) was fine-tuned on offline-teacher traces (SFT), then trained "
        f"with self-supervised dual GRPO ({grpo.get('max_steps')} steps, rewards: format + dual, no labels). "
        f"Cell sentences have {prepare.get('top_k')} genes. Every number below is on held-out test cells. "
        f"The settings of every stage are the recipes in `{plan.label}` (metrics.json: `plan`).",
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


def run_demo(
    out: Path = Path("demo_out"), quick: bool = False, seed: int = 0, recipes: Path | None = None
) -> Path:
    """Run every stage with the plan's recipes (``recipes``: a folder of one's own; else the packaged
    full plan, or the quick one); return the report folder."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    console = Console()
    plan = Plan.named(str(recipes)) if recipes is not None else QUICK if quick else FULL
    mode = "quick" if quick else "full" if recipes is None else "recipes"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Stages(console)
    with timer.stage("1/6 prepare", "cell sentences and task examples from embedded real data"):
        folders = stages.prepare(plan, out, seed, console)
    with timer.stage("2/6 SFT", "offline-teacher traces (forward + dual) -> supervised fine-tuning"):
        stages.sft(plan, out, folders, seed)
    with timer.stage("3/6 dual GRPO", "self-supervised rewards from the dual tasks, no labels"):
        grpo = stages.grpo(plan, out, folders, seed)
    with timer.stage("4/6 eval", "SFT and dual GRPO against baselines on held-out cells"):
        results = stages.evaluate(plan, out, folders, seed, [("SFT", "sft"), ("dual GRPO", "grpo")])
    with timer.stage("5/6 dual check", "does each dual reward score right answers above wrong ones?"):
        checks = stages.dual_check(plan, out, folders, seed)
    with timer.stage("6/6 report", "tables and plots"):
        curves = dual_reward_curves(grpo.state.log_history)
        monitor = monitor_series(grpo.state.log_history)
        report = _write_report(out, results, curves, timer.timings, plan, mode, seed, checks, monitor)
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
