"""Task builders on real data: record contract, duals, splits, the prepare command."""

from __future__ import annotations

import json

import pytest

from cellduality.cli import main
from cellduality.data import DataError, load_dataset
from cellduality.parsing import parse_label
from cellduality.tasks import RECORD_COLUMNS, TaskConfig, build_tasks, dual_prompt, dual_score, load_prepared
from cellduality.tasks.dual import forward_answer

CFG = TaskConfig(top_k=20, max_examples=40, seed=0)


@pytest.fixture(scope="module")
def pbmc_tasks(pbmc):
    return build_tasks(pbmc, config=CFG)


@pytest.fixture(scope="module")
def norman_tasks(norman):
    return build_tasks(norman, config=CFG, split="ood")


def test_record_contract(pbmc_tasks) -> None:
    ds = pbmc_tasks.datasets
    assert set(ds) == {"train", "test"}
    assert tuple(ds["train"].column_names) == RECORD_COLUMNS
    assert set(ds["train"]["task"]) == {"annotation", "generation"}
    for row in ds["train"]:
        assert row["prompt"][0]["role"] == "system" and row["prompt"][1]["role"] == "user"
        assert row["id"].startswith(f"pbmc68k/{row['task']}/train/")
        if row["task"] == "annotation":
            assert row["answer"] in row["candidates"]
            assert len(row["candidates"]) == 10
            assert sorted(row["visible_genes"] + row["hidden_genes"]) == sorted(row["cell_genes"])
            assert len(row["hidden_genes"]) == 5  # 25% of 20
            assert " ".join(row["cell_genes"]) in row["prompt"][1]["content"]
            # the label appears only inside the candidate list
            assert row["answer"] not in row["prompt"][1]["content"].replace(", ".join(row["candidates"]), "")
        else:
            assert row["condition"] in row["candidates"]
            assert len(row["answer"].split()) == 20 and row["n_genes"] == 20
            assert row["condition"] in row["prompt"][1]["content"]


def test_deterministic(pbmc) -> None:
    a = build_tasks(pbmc, config=CFG).datasets["train"]
    b = build_tasks(pbmc, config=CFG).datasets["train"]
    assert a["id"] == b["id"] and a["prompt"] == b["prompt"] and a["hidden_genes"] == b["hidden_genes"]


def test_hidden_answer_not_in_dual_prompt(pbmc_tasks) -> None:
    row = next(r for r in pbmc_tasks.datasets["train"] if r["task"] == "annotation")
    text = dual_prompt(row, row["candidates"][0])[1]["content"]
    assert row["candidates"][0] in text
    for gene in row["hidden_genes"]:
        assert gene not in text.split()
    perfect = "<think>x</think><answer>" + " ".join(row["hidden_genes"]) + "</answer>"
    assert dual_score(row, perfect) == pytest.approx(1.0)
    assert dual_score(row, "<think>x</think><answer>NOTAGENE</answer>") == 0.0
    assert dual_score(row, "garbage") == 0.0


def test_generation_dual(pbmc_tasks) -> None:
    row = next(r for r in pbmc_tasks.datasets["train"] if r["task"] == "generation")
    generated = forward_answer(row, f"<think>t</think><answer>{row['answer']}</answer>")
    assert generated == row["answer"]
    prompt = dual_prompt(row, generated)[1]["content"]
    question = prompt.split("Choose")[0].split("Candidates")[0]  # the part before the candidate list
    assert generated in prompt and row["condition"] not in question
    assert dual_score(row, f"<think>t</think><answer>{row['condition']}</answer>") == 1.0
    other = next(c for c in row["candidates"] if c != row["condition"])
    assert dual_score(row, f"<think>t</think><answer>{other}</answer>") == 0.0


def test_perturbation_tasks(norman_tasks) -> None:
    meta = norman_tasks.meta
    holdout = set(meta["split"]["perturbation"]["holdout"])
    train, test = norman_tasks.datasets["train"], norman_tasks.datasets["test"]
    assert holdout and not (set(train["condition"]) & holdout)
    assert set(test["condition"]) <= holdout
    assert "control" not in set(train["condition"])
    for row in test:
        assert row["condition"] in row["candidates"] and "control" in row["candidates"]
        assert len(row["candidates"]) <= CFG.max_candidates
        content = row["prompt"][1]["content"]
        assert " ".join(row["cell_genes"]) in content
        for target in row["condition"].split("+"):
            assert target in row["condition_text"] and row["condition_text"] in content
        assert ("CRISPRa" in row["condition_text"]) == (row["context"] == "cell type: k562")
        dual = dual_prompt(row, row["answer"])[1]["content"]
        assert " ".join(row["cell_genes"]) in dual and row["answer"] in dual


def test_drug_sensitivity_tasks() -> None:
    data = load_dataset("scad_plx4720")
    prepared = build_tasks(data, config=TaskConfig(top_k=30))
    rows = prepared.datasets["train"]
    assert set(rows["answer"]) == {"sensitive", "resistant"}
    row = rows[0]
    assert "PLX4720" in row["prompt"][1]["content"]
    dual = dual_prompt(row, "resistant")[1]["content"]
    assert "PLX4720-resistant" in dual
    assert (
        parse_label(f"<think>x</think><answer>{row['answer']}</answer>", row["candidates"]) == row["answer"]
    )


def test_glioblastoma_chemical_text() -> None:
    prepared = build_tasks(
        load_dataset("glioblastoma_panobinostat"), config=TaskConfig(top_k=16, max_examples=10)
    )
    row = prepared.datasets["train"][0]
    assert row["condition_text"] == "treatment with panobinostat at 0.2 uM"
    assert sorted(row["candidates"]) == ["ctrl", "panobinostat"]


def test_unsupported_task_refused(pbmc) -> None:
    with pytest.raises(DataError, match="--perturbation-col"):
        build_tasks(pbmc, ["perturbation"], config=CFG)


@pytest.mark.parametrize(
    "name,tasks",
    [
        ("pbmc68k", {"annotation", "generation"}),
        ("scad_plx4720", {"drug_sensitivity"}),
        ("norman_devel", {"perturbation"}),
        ("glioblastoma_panobinostat", {"perturbation"}),
    ],
)
def test_prepare_cli_embedded(name, tasks, tmp_path, capsys) -> None:
    out = tmp_path / name
    assert (
        main(["prepare", "--dataset", name, "--out", str(out), "--top-k", "16", "--max-examples", "30"]) == 0
    )
    prepared = load_prepared(out)
    assert set(prepared.datasets["train"]["task"]) == tasks
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fit"]["r2"] > 0 and len(meta["genes"]) == len(set(meta["genes"]))
    assert "rank -> expression fit" in capsys.readouterr().out


def test_prepare_cli_user_h5ad(pbmc_file, tmp_path, capsys) -> None:
    path = pbmc_file
    out = tmp_path / "pbmc_file"
    code = main(
        [
            "prepare",
            "--dataset",
            str(path),
            "--out",
            str(out),
            "--cell-type-col",
            "bulk_labels",
            "--context-cols",
            "phase",
            "--top-k",
            "16",
            "--split",
            "ood",
            "--holdout",
            "Dendritic",
            "CD19+ B",
        ]
    )
    assert code == 0
    prepared = load_prepared(out)
    train = prepared.datasets["train"]
    assert not ({"Dendritic", "CD19+ B"} & set(train.filter(lambda r: r["task"] == "annotation")["answer"]))
    assert "phase:" in train[0]["prompt"][1]["content"]
    assert f"saved to {out}" in capsys.readouterr().out
    # wrong column: a clear error naming the columns that exist, exit code 2
    code = main(
        ["prepare", "--dataset", str(path), "--out", str(tmp_path / "other"), "--cell-type-col", "cell_type"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bulk_labels" in err and "phase" in err


def test_prepare_cli_bad_dataset(tmp_path, capsys) -> None:
    assert main(["prepare", "--dataset", "no_such_dataset", "--out", str(tmp_path)]) == 2
    assert "embedded dataset" in capsys.readouterr().err
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    assert main(["prepare", "--dataset", str(bad), "--out", str(tmp_path), "--cell-type-col", "x"]) == 2


def test_save_prepared_deletes_nothing_and_reads_only_its_tables(tmp_path, pbmc_tasks) -> None:
    """A folder that already holds a ``tables/`` sub-folder (an earlier preparation's, or anything a user
    put there) keeps every file; the reloaded preparation sees only the tables it wrote."""
    from datasets import Dataset

    from cellduality.tasks import save_prepared
    from cellduality.tasks.build import PreparedTasks

    out = tmp_path / "prepared"
    stale = out / "tables" / "old_table"
    Dataset.from_dict({"x": [1]}).save_to_disk(str(stale))
    (out / "tables" / "notes.txt").write_text("mine")
    before = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    fresh = PreparedTasks(pbmc_tasks.datasets, pbmc_tasks.meta, {"new_table": Dataset.from_dict({"y": [2]})})
    save_prepared(fresh, out)
    assert before <= {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert (out / "tables" / "notes.txt").read_text() == "mine"
    again = load_prepared(out)
    assert set(again.tables) == {"new_table"} and again.tables["new_table"]["y"] == [2]
    assert "tables" not in again.meta
