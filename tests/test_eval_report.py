"""The evaluation report: metrics.json (strict JSON), report.md tables, PNG plots.

Built from hand-made task results, so these tests pin the output format without any model or dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellduality.eval.report import fmt, markdown_table, metrics_payload, render_markdown, write_report
from cellduality.eval.scoring import MethodScore, TaskResult

PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def classification() -> TaskResult:
    labels = ["B cell", "T cell"]
    model = MethodScore(
        "my model",
        "model",
        {"accuracy": 0.5, "macro_f1": 0.4, "valid_output_rate": 0.75, "format_rate": 0.25, "n": 4.0},
        confusion=np.array([[1, 0, 1], [1, 1, 0]]),
    )
    mute = MethodScore(
        "mute model",
        "model",
        {"accuracy": 0.0, "macro_f1": 0.0, "valid_output_rate": 0.0, "format_rate": 0.0, "n": 4.0},
        confusion=np.array([[0, 0, 2], [0, 0, 2]]),
    )
    majority = MethodScore(
        "majority class",
        "baseline",
        {"accuracy": 0.5, "macro_f1": 0.333, "valid_output_rate": 1.0, "n": 4.0},
        confusion=np.array([[2, 0, 0], [2, 0, 0]]),
    )
    return TaskResult("annotation", 4, [model, mute, majority], labels=labels)


def generation() -> TaskResult:
    rng = np.random.default_rng(0)
    model = MethodScore(
        "my model",
        "model",
        {
            "knn_accuracy": 0.25,
            "scfid": 12.5,
            "rwjs_nearest": 0.3,
            "valid_output_rate": 0.5,
            "format_rate": 1.0,
        },
        points=rng.normal(size=(2, 2)),
        point_labels=["B cell", "T cell"],
    )
    mute = MethodScore(
        "mute model",
        "model",
        {"knn_accuracy": 0.0, "scfid": NAN, "rwjs_nearest": 0.0, "valid_output_rate": 0.0},
        points=np.zeros((0, 2)),
        point_labels=[],
    )
    return TaskResult(
        "generation",
        4,
        [model, mute],
        reference_points=rng.normal(size=(4, 2)),
        reference_labels=["B cell", "B cell", "T cell", "T cell"],
        info={"k": 3},
    )


def perturbation() -> TaskResult:
    groups = ["KLF1 (cell type: k562)", "MAPK1 (cell type: k562)"]
    per = {g: {"pearson_delta": v, "n": 3.0} for g, v in zip(groups, [0.4, NAN], strict=True)}
    model = MethodScore(
        "my model",
        "model",
        {"pearson_delta": 0.4, "retrieval": 0.5, "valid_output_rate": 0.5, "n_scored": 1.0},
        per_condition=per,
    )
    ceiling = MethodScore(
        "split-half reproducibility",
        "ceiling",
        {"pearson_delta": 0.8},
        per_condition={g: {"pearson_delta": 0.8, "n": 3.0} for g in groups},
        note="split-half of the observed cells",
    )
    return TaskResult("perturbation", 6, [model, ceiling], info={"n_de": 20, "perturbations": groups})


INFO = {
    "dataset": "toy",
    "split": "test",
    "n_examples": {"annotation": 4, "generation": 4, "perturbation": 6},
    "models": [{"name": "my model", "path": "/models/m", "adapter": "/models/lora"}],
    "generation": {"backend": "hf", "temperature": 0.0, "max_new_tokens": 64},
    "fit": {"slope": -1.5, "intercept": 4.9, "r2": 0.91},
    "notes": ["raw counts: normalised"],
}


def test_fmt_and_table() -> None:
    assert fmt(0.12345) == "0.123" and fmt(NAN) == "—" and fmt(None) == "—" and fmt(12.0, "n") == "12"
    table = markdown_table(["a", "b|c"], [["x", "1"]])
    assert table.splitlines() == ["| a | b\\|c |", "|---|---|", "| x | 1 |"]


def test_report_files_tables_and_plots(tmp_path) -> None:
    tasks = {"annotation": classification(), "generation": generation(), "perturbation": perturbation()}
    files = write_report(tasks, INFO, tmp_path)
    report = (tmp_path / "report.md").read_text()
    # one table per task, models and baselines side by side, directions shown
    assert "## Cell type annotation (cell -> type)" in report
    assert "| method | type | accuracy ↑ | macro-F1 ↑ | valid output ↑ | format ↑ | n |" in report
    # the best model or baseline of each scored column is bold (a tie bolds both)
    assert "| my model | model | **0.500** | **0.400** | 0.750 | 0.250 | 4 |" in report
    assert "| mute model | model | 0.000 | 0.000 | 0.000 | 0.000 | 4 |" in report
    assert "| majority class | baseline | **0.500** | 0.333 | 1.000 | — | 4 |" in report
    assert (
        "kNN@3 accuracy ↑" in report
        and "| mute model | model | 0.000 | — | 0.000 | 0.000 | — | — |" in report
    )
    # this ceiling (0.8) bounds the model (0.4), so it may keep the word
    assert "Pearson Δ top-20 DE ↑" in report and "| split-half reproducibility | ceiling |" in report
    assert "| KLF1 (cell type: k562) | 3 | 0.400 | 0.800 |" in report
    assert "### Pearson Δ (all genes) ↑ per perturbation (all 2)" in report
    assert "LoRA `/models/lora`" in report and "R² = 0.910" in report and "raw counts: normalised" in report
    # plots: valid PNGs, embedded in the report
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["confusion_annotation.png", "pca_generation.png", "pearson_delta_per_perturbation.png"]
    import matplotlib.image as mpimg

    for name in plots:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == PNG
        image = mpimg.imread(tmp_path / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"](plots/{name})" in report
    assert files["report"] == tmp_path / "report.md" and files["metrics"] == tmp_path / "metrics.json"


def test_metrics_json_is_strict_and_complete(tmp_path) -> None:
    tasks = {"annotation": classification(), "generation": generation(), "perturbation": perturbation()}
    write_report(tasks, INFO, tmp_path, plots=False)
    text = (tmp_path / "metrics.json").read_text()
    payload = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert payload == json.loads(json.dumps(metrics_payload(tasks, INFO)))
    ann = payload["tasks"]["annotation"]["methods"]
    assert ann["my model"]["confusion"] == {
        "labels": ["B cell", "T cell", "(invalid)"],
        "matrix": [[1, 0, 1], [1, 1, 0]],
    }
    assert payload["tasks"]["generation"]["methods"]["mute model"]["metrics"]["scfid"] is None
    per = payload["tasks"]["perturbation"]["methods"]["my model"]["per_condition"]
    assert per["MAPK1 (cell type: k562)"]["pearson_delta"] is None
    assert payload["run"]["dataset"] == "toy"
    assert not (tmp_path / "plots").exists()


def test_report_without_methods_or_points(tmp_path) -> None:
    empty = TaskResult("generation", 0, [], reference_points=None)
    files = write_report({"generation": empty}, {"dataset": "toy", "split": "test"}, tmp_path)
    assert "Nothing to report" in files["report"].read_text()
    assert "No model: baselines only" in files["report"].read_text()
    assert not any(k.startswith("plot:") for k in files)


def test_render_markdown_is_plain_text() -> None:
    text = render_markdown({"annotation": classification()}, INFO, {})
    assert text.startswith("# CellDuality evaluation")
    assert "nan" not in text.lower().replace("nanmean", "")


# ------------------------------------------------------------------------------ ceilings and headlines


def _row(name: str, kind: str, **metrics: float) -> MethodScore:
    return MethodScore(name, kind, dict(metrics))


def test_a_ceiling_in_the_report_bounds_every_row_it_is_compared_with(tmp_path) -> None:
    """Property: whatever the report labels a ceiling scores at least as well as every other row, on
    every metric of the table, in its direction (↑ or ↓); otherwise it is shown as a reference."""
    from cellduality.eval.report import TASK_METRICS
    from cellduality.metrics.registry import metric_info

    rng = np.random.default_rng(0)
    keys = TASK_METRICS["perturbation"]
    relabelled = 0
    for trial in range(40):
        rows = [
            _row(f"{kind} {i}", kind, **{k: float(rng.uniform(-1, 1)) for k in keys})
            for i, kind in enumerate(["model", "model", "baseline", "baseline", "ceiling", "ceiling"])
        ]
        if trial % 2:  # half the trials: a ceiling that really is the best on every column
            best = {
                k: (max if metric_info(k).higher_is_better is not False else min)(r.metrics[k] for r in rows)
                for k in keys
            }
            rows[4].metrics = dict(best)
        result = TaskResult("perturbation", 4, rows, info={"n_de": 20})
        payload = metrics_payload({"perturbation": result}, {"dataset": "toy"})
        text = render_markdown({"perturbation": result}, {"dataset": "toy"}, {})
        methods = payload["tasks"]["perturbation"]["methods"]
        ceilings = [n for n, item in methods.items() if item["kind"] == "ceiling"]
        for name in ceilings:
            bound = methods[name]["metrics"]
            for other, item in methods.items():
                if other == name:
                    continue
                for k in keys:
                    info = metric_info(k)
                    if info.higher_is_better is None:
                        continue
                    value = item["metrics"][k]
                    assert not info.better(value, bound[k]), (name, other, k)
            assert f"| {name} | ceiling |" in text
        for r in rows:
            if r.kind == "reference" and r.name.startswith("ceiling"):
                relabelled += 1
                assert "not an upper bound" in r.note and f"| {r.name} | reference |" in text
        if trial % 2:
            assert "ceiling 4" in ceilings
    assert relabelled >= 40  # random ceilings are nearly always beaten somewhere: they were relabelled


def _perturbation_with_baselines() -> TaskResult:
    """Numbers like the demo report's: SFT beats the control copy on DE genes, the mean perturbation
    baseline beats SFT on all genes."""
    rows = [
        _row("SFT", "model", pearson_delta=0.023, pearson_delta_de=0.214),
        _row("dual GRPO", "model", pearson_delta=0.020, pearson_delta_de=0.200),
        _row("control cell's sentence", "baseline", pearson_delta=0.010, pearson_delta_de=0.050),
        _row("control mean", "baseline", pearson_delta=NAN, pearson_delta_de=NAN),
        _row("mean perturbation", "baseline", pearson_delta=0.138, pearson_delta_de=0.150),
        _row("split-half reproducibility", "reference", pearson_delta=0.9, pearson_delta_de=0.162),
    ]
    return TaskResult("perturbation", 10, rows, info={"n_de": 20})


def test_headline_shows_strongest_and_simplest_baseline_and_says_when_a_baseline_wins() -> None:
    from cellduality.eval.headline import headline_markdown, task_headline

    rows = {r["metric_key"]: r for r in task_headline(_perturbation_with_baselines(), "norman")}
    assert list(rows) == ["pearson_delta_de", "pearson_delta"]  # the all-genes figure next to the DE one
    de, all_genes = rows["pearson_delta_de"], rows["pearson_delta"]
    assert de["metric"] == "Pearson Δ top-20 DE ↑" and all_genes["metric"] == "Pearson Δ all genes ↑"
    assert de["baseline"] == "control cell's sentence" and de["strongest baseline"] == "mean perturbation"
    assert de["verdict"] == "SFT beats every baseline"
    assert all_genes["strongest baseline"] == "mean perturbation" and all_genes["strongest value"] == 0.138
    assert all_genes["verdict"].startswith("a simple baseline wins: mean perturbation")
    assert all_genes["SFT"] == 0.023 and all_genes["baseline value"] == 0.010
    lines = headline_markdown(list(rows.values()), ["SFT", "dual GRPO"])
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| mean perturbation 0.138 | a simple baseline wins" in lines[3]
    # a reference row is never the "strongest baseline", and the report says who wins under the table
    text = render_markdown({"perturbation": _perturbation_with_baselines()}, {"dataset": "toy"}, {})
    assert "**a simple baseline wins: mean perturbation (0.138 vs SFT 0.023)**" in text
    assert "| mean perturbation | baseline | **0.138** |" in text


def test_friendly_names_and_directions_come_from_the_registry() -> None:
    from cellduality.eval.headline import task_headline
    from cellduality.eval.report import COLUMNS
    from cellduality.metrics.registry import METRICS, describe_directions, metric_label

    assert metric_label("knn_accuracy", k=3) == "kNN@3 accuracy"
    assert METRICS["scfid"].higher_is_better is False and METRICS["scfid"].better(1.0, 2.0)
    assert METRICS["accuracy"].better(0.9, NAN) and not METRICS["accuracy"].better(NAN, 0.1)
    assert "scFID: lower is better, best 0" in describe_directions(["scfid"])
    headers = {key: title for cols in COLUMNS.values() for key, title in cols}
    assert headers["rmse_de"].endswith("↓") and headers["macro_f1"].endswith("↑")
    gen = task_headline(generation())
    assert [r["metric"] for r in gen] == ["kNN@3 accuracy ↑"]
    ann = task_headline(classification())
    assert [r["metric"] for r in ann] == ["accuracy ↑", "macro-F1 ↑"]  # side by side
    assert ann[0]["verdict"].startswith("tie") and ann[1]["verdict"] == "my model beats every baseline"
    payload = metrics_payload({"generation": generation()}, {"dataset": "toy"})
    info = {m["key"]: m for m in payload["metric_info"]}
    assert info["knn_accuracy"]["higher_is_better"] is True and info["scfid"]["best"] == 0.0


# ------------------------------------------------------------------------------------------------ plots


def test_pca_counts_identical_cells_and_names_its_colours() -> None:
    from cellduality.eval.plots import coloured_groups, pca_figure, stack_identical

    where, counts = stack_identical(np.array([[0, 0], [1, 1], [0, 0], [0, 0]], dtype=float))
    assert sorted(counts.tolist()) == [1, 3] and where.shape == (2, 2)
    # 120 generated cells on 8 positions, 52 groups: the title says so, and a legend names the colours
    rng = np.random.default_rng(0)
    groups = [f"P{i}" for i in range(52)]
    ref_labels = [g for g in groups for _ in range(3)]
    centres = rng.normal(size=(8, 2))
    labels = [groups[i % 8] for i in range(120)]
    model = MethodScore("SFT", "model", {}, points=centres[np.arange(120) % 8], point_labels=labels)
    result = TaskResult(
        "perturbation",
        120,
        [model],
        reference_points=rng.normal(size=(len(ref_labels), 2)),
        reference_labels=ref_labels,
    )
    fig = pca_figure(result, max_legend=10)
    ax = fig.axes[0]
    assert "120 generated cells at 8 distinct positions" in ax.get_title()
    assert "marker area ∝ count" in ax.get_title() and "10 largest of 52 groups" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "real cells" in legend and any(t.startswith("other (42 groups)") for t in legend)
    assert len(coloured_groups(ref_labels, 10)) == 10
    assert sum(int(t.get_text()[1:]) for t in ax.texts if t.get_text().startswith("×")) == 120


def test_per_perturbation_bars_show_every_group_or_say_how_many() -> None:
    from cellduality.eval.plots import pearson_delta_figure

    groups = [f"G{i}" for i in range(52)]
    per = {g: {"pearson_delta": 0.1} for g in groups}
    result = TaskResult(
        "perturbation",
        52,
        [MethodScore("SFT", "model", {}, per_condition=per)],
        info={"perturbations": groups},
    )
    ax = pearson_delta_figure(result).axes[0]
    assert len(ax.get_yticklabels()) == 52 and "all 52 perturbations" in ax.get_title()
    ax = pearson_delta_figure(result, limit=40).axes[0]
    assert len(ax.get_yticklabels()) == 40 and "first 40 of 52" in ax.get_title()


def test_reward_curves_get_one_panel_each() -> None:
    from cellduality.eval.plots import reward_figure

    same = [(s, 0.5) for s in range(1, 13)]  # two identical curves: in one axes one would hide the other
    fig = reward_figure({"annotation": same, "generation": same, "all tasks": same})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    assert sorted(ax.get_title().split(" (")[0] for ax in visible) == [
        "all tasks",
        "annotation",
        "generation",
    ]
    assert all(len(ax.lines) == 1 for ax in visible)
