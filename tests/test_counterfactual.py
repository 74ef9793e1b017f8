"""Counterfactual dual examples for perturbation: every candidate is named from a real cell showing it,
the unchanged control cell is named `control`, and the trace names what changed."""

from __future__ import annotations

from collections import Counter

import pytest

from cellduality.data import load_dataset
from cellduality.parsing import parse_completion, parse_label
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.teacher.counterfactual import counterfactual_examples
from cellduality.teacher.offline import OfflineTeacher, perturbation_rationale


@pytest.mark.parametrize("name", ["glioblastoma_panobinostat", "norman2019_k562"])
def test_every_candidate_is_named_from_a_real_cell_that_shows_it(name: str) -> None:
    prepared = build_tasks(load_dataset(name), config=TaskConfig(top_k=16, max_examples=120, seed=0))
    train = [r for r in prepared.datasets["train"].to_list() if r["task"] == "perturbation"]
    control = "ctrl" if name.startswith("glio") else "control"
    rows = train[:30]
    examples = counterfactual_examples(rows, train, OfflineTeacher(prepared, concise=True), prepared.meta)
    real = {r["answer"]: r["condition"] for r in train}
    controls = {" ".join(r["cell_genes"][: r["n_genes"]]) for r in train}
    by_row = {r["id"]: r for r in rows}
    named: Counter[str] = Counter()
    for ex in examples:
        row = by_row[ex["id"].split("/counterfactual/")[0]]
        text = ex["completion"][0]["content"]
        answer = parse_label(text, row["candidates"])
        assert answer is not None and parse_completion(text).well_formed
        prompt = ex["prompt"][-1]["content"]
        paired = " ".join(row["cell_genes"][: row["n_genes"]])
        shown = prompt.split(paired, 1)[1]  # what follows the control cell: the cell to be named
        cells = [c for c in (*real, *controls) if c in shown]
        assert cells, "the cell shown is a real training cell"
        truth = real.get(cells[0], control)
        assert answer == truth, (answer, truth)
        named["own" if answer == row["condition"] else "control" if answer == control else "other"] += 1
    # the row's own perturbation and the control value are named alike often: no name favoured by the data
    assert named["own"] >= len(rows) and named["control"] >= len(rows)
    assert abs(named["own"] - named["control"]) <= len(rows) // 2


def test_rationale_names_what_changed() -> None:
    assert perturbation_rationale(["A", "B", "C"], ["A", "B", "C"], "x").startswith("gained: none")
    text = perturbation_rationale(["A", "B", "C"], ["A", "D", "C"], "x")
    assert text == "gained: D; lost: B; the change matches x"
