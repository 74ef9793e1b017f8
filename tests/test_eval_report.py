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
    assert "| my model | model | 0.500 | 0.400 | 0.750 | 0.250 | 4 |" in report
    assert "| mute model | model | 0.000 | 0.000 | 0.000 | 0.000 | 4 |" in report
    assert "| majority class | baseline | 0.500 | 0.333 | 1.000 | — | 4 |" in report
    assert (
        "kNN@3 accuracy ↑" in report
        and "| mute model | model | 0.000 | — | 0.000 | 0.000 | — | — |" in report
    )
    assert "Pearson Δ top-20 DE ↑" in report and "| split-half reproducibility | ceiling |" in report
    assert "| KLF1 (cell type: k562) | 3 | 0.400 | 0.800 |" in report
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
