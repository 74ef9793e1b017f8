"""No label reaches a self-supervised reward through an id, a candidate list or the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks.dual import CLASSIFICATION_TASKS, dual_prompt

EMBEDDED = ("pbmc68k", "scad_plx4720", "norman_devel", "norman2019_k562", "glioblastoma_panobinostat")


@pytest.fixture(scope="module")
def prepared_all():
    from cellduality.data import load_dataset

    return {
        name: build_tasks(load_dataset(name), config=TaskConfig(top_k=16, max_examples=60, seed=0))
        for name in EMBEDDED
    }


def test_ids_are_opaque(prepared_all) -> None:
    for name, prepared in prepared_all.items():
        for split in prepared.datasets.values():
            ids = split["id"]
            assert len(set(ids)) == len(ids)
            for rid, cell_id in zip(ids, split["cell_id"], strict=True):
                assert cell_id not in rid, (name, rid)
    scad = prepared_all["scad_plx4720"].datasets["train"]
    # SCAD's original cell ids give the response away ('br' resistant / 'par' parental)
    assert any("br" in c or "par" in c for c in scad["cell_id"])
    assert not any("br" in r.split("/")[-1] or "par" in r.split("/")[-1] for r in scad["id"])


@pytest.fixture(scope="module")
def norman_ood():
    from cellduality.data import load_dataset

    return build_tasks(
        load_dataset("norman_devel"),
        ["perturbation"],
        split="ood",
        config=TaskConfig(top_k=16, max_examples=200, seed=0),
    )


def test_candidates_come_from_the_training_split(norman_ood) -> None:
    """OOD perturbation split: no held-out perturbation appears in a training row, prompt or candidates."""
    train, test = norman_ood.datasets["train"], norman_ood.datasets["test"]
    held_out = set(test["condition"]) - set(train["condition"])
    assert held_out, "the OOD split must hold perturbations out"
    for row in train:
        assert not held_out & set(row["candidates"]), row["candidates"]
    for row in test:  # a test question lists its own (held-out) perturbation plus training ones
        assert row["condition"] in row["candidates"]
        assert len(held_out & set(row["candidates"])) == 1


def test_informative_hidden_genes(prepared_all) -> None:
    """The in-painting dual hides the genes that vary most across cells, not housekeeping genes."""
    from cellduality.tasks.common import presence_scores

    prepared = prepared_all["pbmc68k"]
    rows = [r for r in prepared.datasets["train"] if r["task"] == "annotation"]
    scores = presence_scores([r["cell_genes"] for r in rows])
    hidden = np.mean([np.mean([scores[g] for g in r["hidden_genes"]]) for r in rows])
    visible = np.mean([np.mean([scores[g] for g in r["visible_genes"]]) for r in rows])
    assert hidden > visible
    assert prepared.meta["hidden_genes"]["rule"] == "informative"


def _all_texts(row: dict) -> list[str]:
    texts = [m["content"] for m in row["prompt"]] + [row["answer"], ", ".join(row["candidates"])]
    answers = list(row["candidates"]) if row["task"] in CLASSIFICATION_TASKS else [row["answer"]]
    for answer in answers:  # every dual prompt the reward can build from a parsed forward answer
        texts.extend(m["content"] for m in dual_prompt(row, answer))
    return texts


def test_no_unknown_tokens(prepared_all) -> None:
    """Every prompt, answer, candidate list and dual prompt of every embedded dataset, train and test,
    tokenizes without ``<unk>`` for the tiny tokenizer built from the *training* rows alone."""
    from cellduality.modeling import build_tokenizer
    from cellduality.train.common import texts_of_tasks

    for name, prepared in prepared_all.items():
        tok = build_tokenizer(prepared.genes, texts_of_tasks(prepared))
        for split, ds in prepared.datasets.items():
            for row in ds:
                for text in _all_texts(row):
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids, (name, split, row["task"], text[:200])


def test_training_vocabulary_holds_no_held_out_name(norman_ood) -> None:
    """OOD: the tokenizer's words come from training rows; a held-out double is made of gene pieces."""
    from cellduality.modeling import build_tokenizer
    from cellduality.train.common import texts_of_tasks

    prepared = norman_ood
    train, test = prepared.datasets["train"], prepared.datasets["test"]
    held_out = set(test["condition"]) - set(train["condition"])
    tok = build_tokenizer(prepared.genes, texts_of_tasks(prepared))
    vocab = {t.strip() for t in tok.get_vocab()}
    known = {g for g in prepared.genes} | {w for text in texts_of_tasks(prepared) for w in text.split()}
    for name in held_out:
        assert name not in vocab or ("+" not in name and name in known)  # never a compound token
        for target in name.split("+"):
            # a held-out target enters the vocabulary only as a gene of the dataset, never from test rows
            assert (target in vocab) == (target in prepared.genes or target in known)


# -- labels that make a task meaningless are refused, by both prepare paths ----------------------


def _labelled_file(path, labels: list[str]):
    """A small counts file whose cell-type column cycles through ``labels``."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n, g = 60, 30
    x = sp.csr_matrix(rng.poisson(1.0, size=(n, g)).astype(np.float32) + np.eye(n, g, dtype=np.float32))
    obs = pd.DataFrame({"ct": [labels[i % len(labels)] for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"GENE{j}" for j in range(g)])).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        (["B cell", "T cell </answer> naive"], "holding the completion markup"),
        (["B cell", "T cell", "<Answer>NK"], "holding the completion markup"),
        (["B cell", "T cell", "?"], "empty once case, spacing and punctuation are ignored"),
        (["B cell", "T cell", "t  cell."], "differ only by case, spacing or punctuation"),
        (["T cell"], "holds a single cell type class ('T cell')"),
    ],
)
@pytest.mark.parametrize("path_kind", ["block-wise", "in-memory"])
def test_labels_no_answer_can_name_are_refused(labels, reason, path_kind, tmp_path, capsys) -> None:
    from cellduality.cli import main

    path = _labelled_file(tmp_path / "cells.h5ad", labels)
    argv = [
        "prepare",
        "--dataset",
        str(path),
        "--cell-type-col",
        "ct",
        "--top-k",
        "8",
        "--out",
        str(tmp_path / "o"),
    ]
    code = main(argv + (["--in-memory"] if path_kind == "in-memory" else []))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("cellduality prepare: error: column 'ct'") and reason in lines[0], lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_labels_that_are_prefixes_of_each_other_are_fine(tmp_path, capsys) -> None:
    """Matching is exact after normalisation: 'T cell' never takes an answer meant for 'T cell activated'."""
    from cellduality.cli import main
    from cellduality.parsing import parse_label
    from cellduality.tasks import load_prepared

    candidates = ["T cell", "T cell activated", "B cell"]
    for label in candidates:
        assert parse_label(f"<think>x</think><answer>{label.lower()}.</answer>", candidates) == label
    path = _labelled_file(tmp_path / "cells.h5ad", candidates)
    argv = [
        "prepare",
        "--dataset",
        str(path),
        "--cell-type-col",
        "ct",
        "--top-k",
        "8",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--in-memory"]) == 0, capsys.readouterr().err
    train = load_prepared(tmp_path / "o").datasets["train"]
    assert set(train.filter(lambda r: r["task"] == "annotation")["answer"]) == set(candidates)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("T cell", "T cell </answer> naive", "holding the completion markup"),
        ("T cell", "b  cell.", "differ only by case, spacing or punctuation"),
    ],
)
def test_a_folder_prepared_before_the_label_checks_is_refused_when_read(
    old, new, reason, tmp_path, capsys
) -> None:
    """A prepared folder written before labels were checked (simulated: a valid folder whose stored rows
    are rewritten) is refused by every command that reads it, in one line, instead of being trained on."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset, DatasetDict, load_from_disk

    from cellduality.cli import main
    from cellduality.data.schema import DataError
    from cellduality.tasks import load_prepared

    path = _labelled_file(tmp_path / "cells.h5ad", ["B cell", "T cell", "NK cell"])
    folder = tmp_path / "prepared"
    argv = ["prepare", "--dataset", str(path), "--cell-type-col", "ct", "--top-k", "8", "--out", str(folder)]
    assert main([*argv, "--in-memory"]) == 0, capsys.readouterr().err
    load_prepared(folder)  # as prepared today: accepted
    data = load_from_disk(str(folder / "data"))
    rewritten = {}
    for split, ds in data.items():
        table = ds.data.table
        column = table.column("candidates").combine_chunks()
        fixed = pc.replace_substring_regex(column.flatten(), f"^{old}$", new)
        lists = pa.ListArray.from_arrays(column.offsets, fixed)
        i = table.column_names.index("candidates")
        rewritten[split] = Dataset(table.set_column(i, "candidates", lists), info=ds.info)
    (tmp_path / "data_old").mkdir()
    DatasetDict(rewritten).save_to_disk(str(tmp_path / "data_old" / "data"))
    import shutil

    shutil.rmtree(folder / "data")  # this test's own folder, written above
    shutil.move(str(tmp_path / "data_old" / "data"), str(folder / "data"))
    with pytest.raises(DataError, match=f"{reason}.*prepared before these labels were refused"):
        load_prepared(folder)
    capsys.readouterr()  # what this test's own saving printed
    code = main(["eval", "--prepared", str(folder), "--no-plots", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and reason in lines[0], err
