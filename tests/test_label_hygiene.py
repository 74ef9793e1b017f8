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
