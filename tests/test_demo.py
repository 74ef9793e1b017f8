"""The end-to-end demo: the quick run in CI, and the claims of the full run's report.

``test_full_demo_report`` checks what the full demo must show (SFT beats the majority baseline on
annotation, dual rewards rise during GRPO, every task has SFT, GRPO and baselines side by side). It
runs the full demo (13 minutes or more on 2 cores), so it is opt-in: ``make demo-check`` sets
``CELLDUALITY_FULL_DEMO`` to a report folder made by ``make demo`` (or to ``run`` to make one).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from cellduality.demo import ALL_TASKS, dual_reward_curves, trend

TASKS = {"annotation", "generation", "drug_sensitivity", "perturbation"}


def test_trend_and_curves() -> None:
    history = [
        {"step": 1, "dual/annotation/reward": 0.1, "loss": 0.0},
        {"step": 2, "dual/annotation/reward": 0.2, "dual/generation/reward": 1.0},
        {"step": 3, "dual/annotation/reward": 0.6},
        {"train_runtime": 1.0},
    ]
    curves = dual_reward_curves(history)
    assert curves == {"annotation": [(1, 0.1), (2, 0.2), (3, 0.6)], "generation": [(2, 1.0)]}
    assert dual_reward_curves([{"step": 1, "rewards/dual/mean": 0.5}]) == {ALL_TASKS: [(1, 0.5)]}
    t = trend(curves["annotation"])
    assert (
        t["first"] == pytest.approx(0.1)
        and t["last"] == pytest.approx(0.6)
        and t["rise"] == pytest.approx(0.5)
    )
    assert math.isnan(trend(curves["generation"])["rise"])


def _check_report(report: Path) -> dict:
    text = (report / "report.md").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    assert (report / "dual_rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {row["task"] for row in metrics["headline"]} == TASKS
    for name, per_dataset in metrics["datasets"].items():
        assert (report / name / "report.md").exists()
        for task, result in per_dataset["tasks"].items():
            methods = result["methods"]
            assert "SFT" in methods and "dual GRPO" in methods, (name, task)
            assert any(m["kind"] == "baseline" for m in methods.values()), (name, task)
    for task in TASKS:
        assert f"| {task} |" in text
    # the dual reward's validation for both checkpoints, every task, flagged where it fails
    assert set(metrics["dual_check"]) == {"SFT", "dual GRPO"}
    for checks in metrics["dual_check"].values():
        assert {c["task"] for c in checks} == TASKS
        assert all(c["verdict"] for c in checks)
    assert "cellduality dual-check" in text
    # the monitor split: agreement of the dual reward with the truth during GRPO, per task
    assert metrics["monitor"] and all("oracle" in figures for figures in metrics["monitor"].values())
    assert "Monitor split" in text
    if any(not c["carries_signal"] for c in metrics["dual_check"]["SFT"]):
        assert "Flagged: no dual signal" in text
    assert set(metrics["timings_s"]) == {
        "1/6 prepare",
        "2/6 SFT",
        "3/6 dual GRPO",
        "4/6 eval",
        "5/6 dual check",
    }
    return metrics


@pytest.mark.slow
def test_quick_demo(tmp_path, monkeypatch) -> None:
    """``cellduality demo --quick`` end to end: every stage runs and the report has its structure.

    What is asserted is structure, not numbers, so the run uses the ablation's tiny plan (the same
    stages and code paths, smaller sizes): the quick plan took 211 s of the suite's 8 minutes."""
    from cellduality import demo
    from cellduality.ablation import TINY
    from cellduality.cli import main

    monkeypatch.setattr(demo, "QUICK", TINY)
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    metrics = _check_report(tmp_path / "demo" / "report")
    # the report shows what the recipes said
    assert metrics["mode"] == "quick" and metrics["plan"] == TINY.record()
    assert metrics["plan"]["grpo_dual"]["max_steps"] == 2 and metrics["recipes"] == "recipes/ablation/tiny"
    assert metrics["grpo_dual_reward"]["curves"], "the dual reward must be logged during GRPO"


def test_full_demo_report(tmp_path) -> None:
    where = os.environ.get("CELLDUALITY_FULL_DEMO")
    if not where:
        pytest.skip(
            "opt-in (the full demo, about 10 minutes on 2 idle cores): make demo-check, or CELLDUALITY_FULL_DEMO=run|<report folder>"
        )
    if where == "run":
        from cellduality.cli import main

        assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
        report = tmp_path / "demo" / "report"
    else:
        report = Path(where)
    metrics = _check_report(report)
    assert metrics["mode"] == "full"
    annotation = next(r for r in metrics["headline"] if r["task"] == "annotation")
    assert annotation["SFT"] > annotation["baseline value"], "SFT must beat the majority class on annotation"
    trends = metrics["grpo_dual_reward"]["trend"]
    assert trends[ALL_TASKS]["rise"] > 0, f"the dual reward did not rise over GRPO: {trends}"
    assert max(t["rise"] for task, t in trends.items() if task != ALL_TASKS) > 0
    # the dual-signal targets on the SFT checkpoint: right beats wrong, with intervals above 0
    checks = {c["task"]: c for c in metrics["dual_check"]["SFT"]}
    annotation_gap = checks["annotation"]["gaps"][0]
    assert annotation_gap["ci_low"] > 0 and annotation_gap["gap"] >= 0.05, annotation_gap
    generation_gap = checks["generation"]["gaps"][0]
    assert generation_gap["ci_low"] > 0 and generation_gap["gap"] >= 0.15, generation_gap
    for task in ("annotation", "generation"):  # inside mixed sampled groups, right beats wrong
        view = checks[task]["grpo"]
        assert view["dual_of_better"] > view["dual_of_worse"], (task, view)


def test_headline_rows_show_both_baselines_and_a_verdict() -> None:
    """The demo's headline on hand-made results: friendly names, accuracy with macro-F1, simplest and
    strongest baseline, and the words "a simple baseline wins" when one does."""
    from types import SimpleNamespace

    from cellduality.demo import _headline
    from cellduality.eval.headline import headline_markdown
    from cellduality.eval.scoring import MethodScore, TaskResult

    def row(name: str, kind: str, acc: float, f1: float) -> MethodScore:
        return MethodScore(name, kind, {"accuracy": acc, "macro_f1": f1})

    ann = TaskResult(
        "annotation",
        10,
        [
            row("SFT", "model", 0.66, 0.13),
            row("dual GRPO", "model", 0.68, 0.14),
            row("majority class", "baseline", 0.30, 0.05),
            row("logistic regression", "baseline", 0.92, 0.80),
        ],
    )
    rows = _headline({"pbmc68k": SimpleNamespace(tasks={"annotation": ann})})
    assert [r["metric"] for r in rows] == ["accuracy ↑", "macro-F1 ↑"]
    first = rows[0]
    assert first["SFT"] == 0.66 and first["baseline"] == "majority class" and first["baseline value"] == 0.30
    assert first["strongest baseline"] == "logistic regression"
    assert first["verdict"] == "a simple baseline wins: logistic regression (0.920 vs dual GRPO 0.680)"
    text = "\n".join(headline_markdown(rows, ["SFT", "dual GRPO"]))
    assert "| pbmc68k | annotation | macro-F1 ↑ | 0.130 | 0.140 | majority class 0.050 |" in text
