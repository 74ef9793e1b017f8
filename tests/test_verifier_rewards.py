"""The verifier rewards built like every reward, from the run's context: in-memory prepared data (no folder
written), real cells read once and shared, scores equal to eval's formulas on the same truth."""

from __future__ import annotations

import numpy as np
import pytest

from cellduality import metrics as m
from cellduality.parsing import parse_genes
from cellduality.rewards import REWARDS, USES_LABELS, RewardContext, build_rewards
from cellduality.rewards.verifier import VERIFIER_NAMES, PerturbationTruth
from cellduality.sentences import sentence_to_expression
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks.real_data import load_real_data


def formatted(answer: str) -> str:
    return f"<think>because</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def prepared(norman):
    return build_tasks(norman, config=TaskConfig(top_k=16, max_examples=40, seed=0))


def test_registered_and_label_reading() -> None:
    assert set(VERIFIER_NAMES) <= set(REWARDS)
    assert set(VERIFIER_NAMES) <= USES_LABELS


def test_scores_from_the_context(prepared) -> None:
    context = RewardContext.for_data(prepared)
    rewards = build_rewards(list(VERIFIER_NAMES), context)
    # one ground truth for the four rewards, one read of the dataset
    assert len({id(r.truth) for r in rewards}) == 1
    train = [r for r in prepared.datasets["train"] if r["task"] == "perturbation"][:3]
    completions = [formatted(train[0]["answer"]), "no answer", formatted(train[2]["answer"])]
    columns = {k: [r[k] for r in train] for k in train[0]}
    columns["task"] = ["perturbation", "perturbation", "annotation"]  # the last row: another task
    scores = {f.__name__: f(prompts=columns["prompt"], completions=completions, **columns) for f in rewards}
    assert scores["verifier_pearson"][1] == -1.0  # malformed: the lowest value
    assert all(s[1] == (-1.0 if n == "verifier_pearson" else 0.0) for n, s in scores.items())
    assert all(s[2] is None for s in scores.values())
    assert -1.0 < scores["verifier_pearson"][0] <= 1.0
    assert 0.0 < scores["verifier_rmse"][0] <= 1.0
    assert 0.0 <= scores["verifier_spearman"][0] <= 1.0 and 0.0 <= scores["verifier_pathway"][0] <= 1.0
    assert context.real_data(train[0]["dataset"]) is rewards[0].truth.real(train[0]["dataset"])

    # the same number by hand: the train split's cells of this perturbation and context, read from the
    # dataset itself, against the control mean of the context
    row = train[0]
    real = load_real_data(prepared.meta)
    ids = [
        r["cell_id"]
        for r in prepared.datasets["train"]
        if r["task"] == "perturbation"
        and r["condition"] == row["condition"]
        and r["context"] == row["context"]
    ]
    control = m.mean_profile(real.x[real.control_positions(row["context"] or None)])
    delta = m.mean_profile(real.expression(ids)) - control
    genes = parse_genes(completions[0], real.vocabulary, row["n_genes"])
    cell = sentence_to_expression(genes, real.genes, real.fit)
    expected = m.verifier_pearson_de(cell, control, delta, m.de_gene_indices(delta, 20))
    assert scores["verifier_pearson"][0] == pytest.approx(expected)


def test_the_truth_is_per_split_and_refuses_what_is_not_there(prepared) -> None:
    context = RewardContext.for_data(prepared)
    assert PerturbationTruth.for_context(context) is PerturbationTruth.for_context(context)
    assert PerturbationTruth.for_context(context, n_de=10) is not PerturbationTruth.for_context(context)
    with pytest.raises(KeyError, match="no split 'nope'"):
        build_rewards(["verifier_pearson"], context, params={"verifier_pearson": {"split": "nope"}})
    # a context without prepared data (a self-supervised run's) has nothing to verify against
    with pytest.raises(ValueError, match="prepared data"):
        build_rewards(["verifier_rmse"], RewardContext.for_data(prepared, labelled=False))
    real = context.real_data(prepared.meta["dataset"])
    assert np.isfinite(real.x[:2].toarray()).all()
