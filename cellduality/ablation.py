"""``cellduality ablation``: the paper's table in miniature, SFT vs dual GRPO vs oracle GRPO over seeds.

Per seed, on the demo's embedded data (no out-of-distribution split: the perturbation data whose dual
carries signal, glioblastoma_panobinostat, has a single perturbation to hold out), one SFT
checkpoint of the full demo's size, then two GRPO runs from it with the same steps, data and settings:
self-supervised dual rewards (no labels) and the oracle's ground-truth rewards. All three are evaluated
on held-out cells next to the baselines, and the dual reward is validated on the SFT and the dual GRPO checkpoints
(``cellduality dual-check``). The report gives, per task, the mean and 95% interval across seeds, and
the share of the SFT -> oracle gap that dual GRPO closes (undefined where the oracle does not beat SFT),
and the goal judged part by part with the measured reasons (``cellduality.ablation_goal``).

The stages are :mod:`cellduality.stages`' (the demo's); every size and setting, and why it was chosen,
is in the plan's recipes: ``recipes/ablation/full/*.yaml`` (``ABLATION``), ``recipes/ablation/tiny/*.yaml``
(``--tiny``), or a folder of one's own (``--recipes``).

Every stage writes a ``.done`` marker after its outputs, so running the same command again resumes
where it stopped: finished stages are read back, never redone, and nothing a stage did not write is
touched.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cellduality import stages
from cellduality.ablation_goal import assess, dual_check_by_seed, goal_markdown, interval, paired_differences
from cellduality.eval.headline import HEADLINE_METRICS
from cellduality.metrics.registry import best_item, metric_info
from cellduality.stages import RECIPES, Plan

#: the packaged plans: recipes/ablation/full (the default: the paper's data design, the full demo's SFT
#: and dual arm, every test row evaluated greedy and sampled) and --tiny's (minutes: checks the pipeline)
ABLATION = Plan(RECIPES / "ablation" / "full")
TINY = Plan(RECIPES / "ablation" / "tiny")
ARMS = ("SFT", "dual GRPO", "oracle GRPO")
DONE = ".done"

#: task -> the metric the ablation compares the arms on: the first headline metric of the task (its name,
#: direction and best value come from the metric registry, ``cellduality.metrics.registry``)
HEADLINE = {task: keys[0] for task, keys in HEADLINE_METRICS.items() if task != "neighbourhood"}


@dataclass
class AblationConfig:
    out: Path
    seeds: Sequence[int] = (0, 1, 2)
    plan: Plan = field(default_factory=lambda: ABLATION)
    #: the label-efficiency curve: RL-pool sizes (prompt cells per task) to train dual GRPO with, from
    #: each seed's SFT checkpoint; the main run's own size is one point of it
    pool_sizes: Sequence[int] = ()


def _stage(folder: Path, what: str, run: Callable[[], Any], console: Console, label: str) -> Any:
    """Run ``run`` unless ``folder/.done`` says it finished before; the marker holds its result."""
    marker = folder / DONE
    if marker.exists():
        console.print(f"[dim]{label}: {what} done before, reusing {folder}")
        return json.loads(marker.read_text())
    console.rule(f"[bold]{label}[/bold]: {what}")
    start = time.perf_counter()
    result = run()
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"seconds": round(time.perf_counter() - start, 1), "result": result}
    marker.write_text(json.dumps(payload, default=str))
    console.print(f"[green]{label}: {what} done in {payload['seconds']:.0f} s")
    return payload


def reward_curves(
    log_history: list[dict[str, Any]], name: str, figure: str | None = None
) -> dict[str, list[tuple[int, float]]]:
    """Per task, the reward ``name`` logged at each step (``dual/<task>/reward``, ``oracle/<task>/mean``),
    or another of its per-task figures (``zero_std``: groups without variance; ``format``'s ``parsed``)."""
    suffixes = (figure,) if figure else ("reward", "mean")
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == name and parts[2] in suffixes:
                curves.setdefault(parts[1], []).append((int(entry["step"]), float(value)))
    return curves


def run_seed(out: Path, seed: int, plan: Plan, console: Console) -> dict[str, Any]:
    """SFT, dual GRPO, oracle GRPO, evaluation and dual check for one seed (resumable stage by stage)."""
    out.mkdir(parents=True, exist_ok=True)
    label = f"seed {seed}"
    folders_file = out / "prepared" / "folders.json"

    def prepare() -> list[str]:
        folders = [str(f) for f in stages.prepare(plan, out, seed, console)]
        folders_file.write_text(json.dumps(folders))
        return folders

    folders = [Path(f) for f in _stage(out / "prepared", "prepare", prepare, console, label)["result"]]
    _stage(out / "sft", "SFT", lambda: stages.sft(plan, out, folders, seed) and None, console, label)
    curves, training = {}, {}
    for arm, mode, name in (("dual GRPO", "dual", "grpo"), ("oracle GRPO", "oracle", "grpo_oracle")):

        def train(mode: str = mode, name: str = name) -> dict[str, Any]:
            from cellduality.train.collapse import read_collapse

            trainer = stages.grpo(plan, out, folders, seed, arm=mode, name=name)
            history = trainer.state.log_history
            reward = graded_reward(plan, mode)
            return {
                "curves": reward_curves(history, reward),
                "zero_std": reward_curves(history, reward, "zero_std"),
                "parsed": reward_curves(history, "format", "parsed"),
                "frac_reward_zero_std": [
                    (int(e["step"]), float(e["frac_reward_zero_std"]))
                    for e in history
                    if "frac_reward_zero_std" in e and "step" in e
                ],
                "collapse": read_collapse(out / name),
            }

        result = _stage(out / name, arm, train, console, label)["result"]
        curves[arm] = result["curves"]
        training[arm] = {k: v for k, v in result.items() if k != "curves"}

    arms = [("SFT", "sft"), ("dual GRPO", "grpo"), ("oracle GRPO", "grpo_oracle")]

    def evaluate(temperature: float = 0.0, report: Path = out / "report") -> dict[str, Any]:
        results = stages.evaluate(plan, out, folders, seed, arms, temperature=temperature, report=report)
        return {name: json.loads((report / name / "metrics.json").read_text()) for name in results}

    metrics = _stage(out / "report", "evaluation (greedy)", evaluate, console, label)["result"]
    sampled = None
    if stages.eval_settings(
        plan
    ).sampled:  # what GRPO optimises: answers sampled at its own temperature (1.0), seeded
        sampled = _stage(
            out / "report" / "sampled",
            "evaluation (sampled, T = 1)",
            lambda: evaluate(1.0, out / "report" / "sampled"),
            console,
            label,
        )["result"]

    def check() -> dict[str, Any]:
        from cellduality.eval.dual_check import to_json

        return {name: to_json(c) for name, c in stages.dual_check(plan, out, folders, seed).items()}

    checks = _stage(out / "report" / "dual_check", "dual check", check, console, label)["result"]
    return {
        "seed": seed,
        "metrics": metrics,
        "sampled": sampled,
        "curves": curves,
        "training": training,
        "dual_check": checks,
    }


def run_pool_size(out: Path, main: Path, seed: int, plan: Plan, console: Console) -> dict[str, Any]:
    """Dual GRPO from the seed's own SFT checkpoint (``main/sft``, shared: the SFT set does not depend on
    the pool's size) on an RL pool of the prepare recipe's ``rl_examples`` prompt cells per task, then the sampled
    evaluation of that checkpoint next to the SFT's; resumable like the main run."""
    label = f"pool {plan.fields('prepare').get('rl_examples')}, seed {seed}"
    out.mkdir(parents=True, exist_ok=True)

    def prepare() -> list[str]:
        return [str(f) for f in stages.prepare(plan, out, seed, console)]

    folders = [Path(f) for f in _stage(out / "prepared", "prepare", prepare, console, label)["result"]]
    sft = out / "sft"
    if not sft.exists():  # the seed's SFT checkpoint, linked (never copied or moved)
        sft.symlink_to((main / "sft").resolve(), target_is_directory=True)

    def train() -> dict[str, Any]:
        trainer = stages.grpo(plan, out, folders, seed, arm="dual", name="grpo")
        return {"curves": reward_curves(trainer.state.log_history, "dual")}

    _stage(out / "grpo", "dual GRPO", train, console, label)
    report = out / "report" / "sampled"

    def evaluate() -> dict[str, Any]:
        arms = [("SFT", "sft"), ("dual GRPO", "grpo")]
        results = stages.evaluate(plan, out, folders, seed, arms, temperature=1.0, report=report)
        return {name: json.loads((report / name / "metrics.json").read_text()) for name in results}

    return {
        "seed": seed,
        "sampled": _stage(report, "evaluation (sampled, T = 1)", evaluate, console, label)["result"],
    }


def pool_curve(
    main: list[dict[str, Any]], pools: dict[int, list[dict[str, Any]]], plan: Plan
) -> dict[str, Any]:
    """Per task, dual − SFT (sampled, paired per test cell, pooled over seeds, bootstrap interval) at each
    RL-pool size; the task the curve is about is the one where dual GRPO gains most in the main run."""
    from cellduality.ablation_goal import N_BOOT

    def gain(runs: list[dict[str, Any]], dataset: str, task: str) -> tuple[float, float, float] | None:
        diffs = []
        for run in runs:
            methods = (
                (run.get("sampled") or {}).get(dataset, {}).get("tasks", {}).get(task, {}).get("methods", {})
            )
            a, b = (methods.get(arm, {}).get("per_row") for arm in ("dual GRPO", "SFT"))
            if a and b and len(a) == len(b):
                diffs.extend(x - y for x, y in zip(a, b, strict=True))
        if len(diffs) < 2:
            return None
        d = np.asarray(diffs)
        boot = d[np.random.default_rng(0).integers(0, d.size, (N_BOOT, d.size))].mean(axis=1)
        low, high = np.percentile(boot, [2.5, 97.5])
        return (float(d.mean()), float(low), float(high))

    sizes = {**{size: runs for size, runs in pools.items()}, plan.fields("prepare").get("rl_examples"): main}
    curves: dict[str, dict[int, Any]] = {}
    first = main[0].get("sampled") or {}
    for dataset, metrics in first.items():
        for task in metrics.get("tasks", {}):
            curves[f"{dataset}/{task}"] = {
                size: gain(runs, dataset, task) for size, runs in sorted(sizes.items())
            }
    return curves


def plot_pool_curve(curves: dict[str, dict[int, Any]], path: Path) -> None:
    """Dual − SFT against the RL pool's size, one line per task (the label-efficiency curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, points in curves.items():
        xs = [x for x, v in points.items() if v]
        if not xs:
            continue
        means = [points[x][0] for x in xs]
        errs = [[points[x][0] - points[x][1] for x in xs], [points[x][2] - points[x][0] for x in xs]]
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=name.split("/")[-1])
    ax.axhline(0.0, color="#999999", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("RL-pool prompt cells per task (unlabelled)")
    ax.set_ylabel("dual GRPO − SFT, sampled\n(per cell, pooled over seeds, 95% CI)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap_closed(sft: float, dual: float, oracle: float) -> float | None:
    """(dual - SFT) / (oracle - SFT): the share of the oracle's gain that dual GRPO reaches; ``None``
    (undefined) when the oracle does not beat SFT."""
    if any(v is None or math.isnan(v) for v in (sft, dual, oracle)) or oracle <= sft:
        return None
    return (dual - sft) / (oracle - sft)


def _method(metrics: dict[str, Any], task: str, name: str, metric: str) -> float | None:
    task_metrics = metrics.get("tasks", {}).get(task)
    if not task_metrics:
        return None
    value = task_metrics.get("methods", {}).get(name, {}).get("metrics", {}).get(metric)
    return None if value is None else float(value)


def summarise(seeds: list[dict[str, Any]], key: str = "metrics") -> list[dict[str, Any]]:
    """One row per dataset and task: each arm's mean and interval, baselines, and the gap closed
    (``key``: the greedy evaluation, ``metrics``, or the sampled one, ``sampled``)."""
    rows = []
    first = seeds[0].get(key) or {}
    for dataset, metrics in first.items():
        for task in metrics.get("tasks", {}):
            metric = HEADLINE.get(task, "accuracy")
            friendly = metric_info(metric).header()
            arms = {arm: [_method(s[key][dataset], task, arm, metric) for s in seeds] for arm in ARMS}
            closed = [
                gap_closed(a, b, c)
                for a, b, c in zip(arms["SFT"], arms["dual GRPO"], arms["oracle GRPO"], strict=True)
            ]
            baselines = {
                name: m["metrics"].get(metric)
                for name, m in metrics["tasks"][task]["methods"].items()
                if m.get("kind") == "baseline" and m["metrics"].get(metric) is not None
            }
            defined = [c for c in closed if c is not None]
            rows.append(
                {
                    "dataset": dataset,
                    "task": task,
                    "metric": friendly,
                    "metric_key": metric,
                    **{arm: interval([v for v in arms[arm] if v is not None]) for arm in ARMS},
                    "per_seed": arms,
                    "gap_closed": interval(defined) if defined else None,
                    "gap_closed_defined": f"{len(defined)}/{len(closed)} seeds",
                    "gap_closed_n": len(defined),
                    "baselines": baselines,
                }
            )
    return rows


def graded_reward(plan: Plan, arm: str) -> str:
    """The reward an arm's recipe trains on besides ``format`` (``dual``, ``oracle_eval``): the one whose
    per-task curves the report draws."""
    funcs = [r for r in plan.fields(f"grpo_{arm}").get("reward_funcs", []) if r != "format"]
    return funcs[0] if funcs else "format"


def _readers(plan: Plan) -> str:
    """Who answered the dual arm's duals, in words."""
    frozen = ", ".join(plan.fields("grpo_dual").get("dual_frozen_tasks") or ())
    if not frozen:
        return "the policy being trained answered every dual"
    return f"the SFT checkpoint, frozen, answered the duals of {frozen}; the policy every other task's"


def _fmt(triple: Sequence[float] | None) -> str:
    if not triple or math.isnan(triple[0]):
        return "—"
    mean, low, high = triple
    return f"{mean:.3f}" if low == high else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores missing steps (a task is not in every step's batch)."""
    import pandas as pd

    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


def plot_curves(seeds: list[dict[str, Any]], path: Path, window: int = 10) -> None:
    """Dual and oracle reward per task over GRPO steps: each seed's curve smoothed over ``window`` steps,
    then the mean across seeds and a min-max band (raw per-step rewards of 4 prompts are too noisy to
    read a trend from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for s in seeds for arm in s["curves"].values() for t in arm})
    rows = 2 if any(s.get("training") for s in seeds) else 1
    fig, axes = plt.subplots(
        rows, max(1, len(tasks)), figsize=(4 * max(1, len(tasks)), 3.4 * rows), squeeze=False
    )
    for ax, zero_ax, task in zip(axes[0], axes[-1], tasks, strict=False):
        if rows == 2:  # which task's groups teach nothing: the share of groups without reward variance
            for arm, style in (("dual GRPO", "-"), ("oracle GRPO", "--")):
                series = [
                    dict((s.get("training") or {}).get(arm, {}).get("zero_std", {}).get(task, []))
                    for s in seeds
                ]
                steps = sorted(set().union(*[set(c) for c in series])) if series else []
                if steps:
                    values = np.array([[c.get(st, np.nan) for st in steps] for c in series], dtype=float)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        mean = np.nanmean(np.array([_smooth(v, window) for v in values]), axis=0)
                    zero_ax.plot(steps, mean, style, label=arm)
            zero_ax.set_ylim(-0.02, 1.02)
            zero_ax.set_xlabel("GRPO step")
        for arm, style in (("dual GRPO", "-"), ("oracle GRPO", "--")):
            series = [dict(s["curves"].get(arm, {}).get(task, [])) for s in seeds]
            steps = sorted(set().union(*[set(c) for c in series])) if series else []
            if not steps:
                continue
            values = np.array([[c.get(st, np.nan) for st in steps] for c in series], dtype=float)
            smooth = np.array([_smooth(v, window) for v in values])
            with warnings.catch_warnings():  # a step no seed logged is NaN, and stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(smooth, axis=0)
                low, high = np.nanmin(smooth, axis=0), np.nanmax(smooth, axis=0)
            reward = "dual" if arm.startswith("dual") else "oracle"
            ax.plot(steps, mean, style, label=f"{arm} ({reward} reward)")
            ax.fill_between(steps, low, high, alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel(f"reward, {window}-step mean\n(mean over seeds, band = min-max)")
    if rows == 2:
        axes[1][0].set_ylabel("groups with zero reward variance\n(share, mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_arms(rows: list[dict[str, Any]], path: Path) -> None:
    """Per task: SFT / dual / oracle means with their 95% intervals (top), and each GRPO arm's paired
    difference from the same seed's SFT (bottom: one dot per seed, the mean and its interval), which is
    what the comparison rests on: the seeds' test cells differ, so the absolute intervals mostly show
    how hard each seed's test cells are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"SFT": "#999999", "dual GRPO": "#1f77b4", "oracle GRPO": "#ff7f0e"}
    n = max(1, len(rows))
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.8), squeeze=False)
    for k, row in enumerate(rows):
        ax, diff_ax = axes[0][k], axes[1][k]
        means = [row[a][0] for a in ARMS]
        errs = [
            [max(0.0, row[a][0] - row[a][1]) for a in ARMS],
            [max(0.0, row[a][2] - row[a][0]) for a in ARMS],
        ]
        ax.bar(range(3), means, yerr=errs, color=[colours[a] for a in ARMS], capsize=3)
        ax.set_xticks(range(3), ["SFT", "dual", "oracle"])
        ax.set_title(f"{row['task']}\n{row['metric']}", fontsize=9)
        diff_ax.axhline(0.0, color="#999999", lw=1)
        for x, arm in enumerate(("dual GRPO", "oracle GRPO")):
            diffs = paired_differences(row, arm)
            if not diffs:
                continue
            diff_ax.scatter([x] * len(diffs), diffs, color=colours[arm], alpha=0.6, s=18)
            mean, low, high = interval(diffs)
            diff_ax.errorbar(
                [x + 0.15], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=3
            )
        diff_ax.set_xticks(range(2), ["dual − SFT", "oracle − SFT"])
        diff_ax.set_xlim(-0.5, 1.5)
    axes[0][0].set_ylabel("mean [95% CI] over seeds")
    axes[1][0].set_ylabel("per seed: arm − SFT\n(dots), mean [95% CI]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    seeds: list[dict[str, Any]],
    config: AblationConfig,
    pools: dict[int, list[dict[str, Any]]] | None = None,
) -> Path:
    from cellduality.eval.dual_check import markdown_table

    rows = summarise(seeds)
    sampled_rows = summarise(seeds, "sampled") if all(s.get("sampled") for s in seeds) else []
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_curves(seeds, report / "reward_curves.png")
    plot_arms(rows, report / "arms.png")
    goal = assess(rows, seeds, "sampled" if sampled_rows else "greedy")
    payload = {
        "seeds": list(config.seeds),
        "recipes": config.plan.label,
        "plan": config.plan.record(),
        "rows": rows,
        "sampled_rows": sampled_rows,
        "goal": goal,
        "runs": seeds,
    }
    curve = pool_curve(seeds, pools, config.plan) if pools and sampled_rows else None
    if curve:
        payload["pool_curve"] = {
            name: {str(k): v for k, v in points.items()} for name, points in curve.items()
        }
        plot_pool_curve(curve, report / "pool_sizes.png")
    (report / "ablation.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    grpo, prepare = config.plan.fields("grpo_dual"), config.plan.fields("prepare")
    lines = [
        "# CellDuality ablation: SFT vs dual GRPO vs oracle GRPO",
        "",
        f"Seeds {', '.join(map(str, config.seeds))}; per seed one SFT checkpoint, then dual GRPO (self-supervised, "
        "no labels) and oracle GRPO (ground-truth rewards) from it with the same steps, data and settings "
        f"({grpo.get('max_steps')} steps, learning rate {grpo.get('learning_rate'):g} "
        f"({grpo.get('lr_scheduler_type')}), {grpo.get('num_generations')} completions per prompt; "
        f"{_readers(config.plan)}). "
        + (
            f"Data design: {prepare['sft_examples']} labelled training cells per task form the SFT set; GRPO's "
            f"prompts come from the disjoint RL pool (at most {prepare.get('rl_examples')} prompt cells per "
            f"task), whose labels only the oracle arm reads (reward `{graded_reward(config.plan, 'oracle')}`). "
            if prepare.get("sft_examples")
            else ""
        )
        + f"The settings of every stage are the recipes in `{config.plan.label}` (ablation.json: `plan`). "
        + "Held-out test cells (no out-of-distribution split: the perturbation data whose dual carries signal "
        "has a single perturbation). Mean [95% t-interval across seeds]; ↑: higher is better, ↓: lower.",
        "",
        "| answers | dataset | task | metric | SFT | dual GRPO | oracle GRPO | gap closed by dual | best baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, table in (("greedy", rows), ("sampled, T = 1", sampled_rows)):
        for r in table:
            best = best_item(r["baselines"].items(), r["metric_key"], lambda kv: kv[1])
            closed = _fmt(r["gap_closed"]) if r["gap_closed"] else "undefined"
            lines.append(
                f"| {mode} | {r['dataset']} | {r['task']} | {r['metric']} | {_fmt(r['SFT'])} | "
                f"{_fmt(r['dual GRPO'])} | {_fmt(r['oracle GRPO'])} | {closed} ({r['gap_closed_defined']}) | "
                + (f"{best[0]} {best[1]:.3f}" if best else "—")
                + " |"
            )
    lines += [
        "",
        "*Gap closed* = (dual − SFT) / (oracle − SFT) per seed, over the seeds where the oracle beats SFT "
        "(undefined where it never does).",
        "",
        "![SFT, dual and oracle per task; below, each arm minus the same seed's SFT](arms.png)",
        "",
        *goal_markdown(goal),
        *(_pool_markdown(curve) if curve else []),
        "## Rewards during GRPO",
        "",
        "![dual and oracle rewards per task](reward_curves.png)",
        "",
        "## Dual check before and after GRPO",
        "",
        "Gap of the dual reward between a right and a wrong forward answer (95% bootstrap interval), SFT "
        "checkpoint → dual GRPO checkpoint, per seed:",
        "",
        *dual_check_by_seed(seeds),
        "",
        f"Every table of seed {seeds[0]['seed']} (the others are in `seed<N>/report/dual_check/`):",
        "",
    ]
    for name, checks in seeds[0]["dual_check"].items():
        from cellduality.eval.dual_check import from_json

        lines += [*markdown_table(from_json(checks), title=f"{name} checkpoint"), ""]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return report


def _pool_markdown(curve: dict[str, dict[int, Any]]) -> list[str]:
    sizes = sorted({size for points in curve.values() for size in points})
    lines = [
        "## Label efficiency: dual GRPO's gain against the RL pool's size",
        "",
        "Dual GRPO from the same SFT checkpoints with RL pools of different sizes (unlabelled prompt cells per "
        "task); dual − SFT on sampled answers, per test cell, pooled over the seeds, 95% bootstrap interval.",
        "",
        "| task | " + " | ".join(f"{s} cells" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name, points in curve.items():
        lines.append(
            f"| {name.split('/')[-1]} | "
            + " | ".join(
                "—"
                if not points.get(s)
                else f"{points[s][0]:+.3f} [{points[s][1]:+.3f}, {points[s][2]:+.3f}]"
                for s in sizes
            )
            + " |"
        )
    return [*lines, "", "![dual GRPO − SFT against the RL pool's size](pool_sizes.png)", ""]


PLAN_FILE = "plan.json"


def plan_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``stage.field`` for each recipe field that differs (a stage for a whole recipe added or removed,
    or a plan stored before plans were recipes)."""
    found = []
    for stage in sorted(set(before) | set(now)):
        old, new = before.get(stage), now.get(stage)
        if isinstance(old, dict) and isinstance(new, dict):
            found += [f"{stage}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            found.append(stage)
    return found


def check_plan(out: Path, plan: Plan) -> None:
    """Resume only under the plan the finished stages were made with; record it on a first run.

    The stage markers say that a stage finished, not with which sizes: a run resumed under another plan
    (``--tiny`` into a full run's folder, or an edited recipe) would mix the two in one table. The plan is
    what the recipes say (:meth:`Plan.record`), so a resumed run compares every field of every recipe.
    """
    path = out / PLAN_FILE
    now = plan.record()
    if path.exists():
        before = json.loads(path.read_text())
        if before != now:
            changed = ", ".join(plan_differences(before, now))
            raise SystemExit(
                f"cellduality ablation: error: {out} holds a run with another plan ({changed} differ); "
                "give a new --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1) + "\n")


def run_ablation(config: AblationConfig) -> Path:
    """Every seed (resuming finished stages), then the report; returns the report folder."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    console = Console()
    out = Path(config.out)
    check_plan(out, config.plan)
    seeds = []
    for k, seed in enumerate(config.seeds, start=1):
        console.rule(f"[bold]ablation run {k}/{len(config.seeds)}: seed {seed}")
        seeds.append(run_seed(out / f"seed{seed}", seed, config.plan, console))
    pools: dict[int, list[dict[str, Any]]] = {}
    for size in config.pool_sizes:
        if size == config.plan.fields("prepare").get("rl_examples"):
            continue  # the main run is that point
        plan = config.plan.replace("prepare", rl_examples=size)
        pools[size] = [
            run_pool_size(
                out / "pool_sizes" / f"rl{size}" / f"seed{seed}", out / f"seed{seed}", seed, plan, console
            )
            for seed in config.seeds
        ]
    report = write_report(out, seeds, config, pools)
    console.print(f"[bold green]saved to {report / 'report.md'}")
    return report


def tiny_config(out: Path, seeds: Sequence[int] = (0, 1)) -> AblationConfig:
    """A few-minute budget for tests: the same code path, tiny sizes."""
    return AblationConfig(out=out, seeds=tuple(seeds), plan=TINY)
