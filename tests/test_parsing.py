"""Completion parsing and gene cleaning, including a fuzz with random and adversarial strings."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cellduality.parsing import (
    clean_genes,
    gene_vocabulary,
    parse_completion,
    parse_genes,
    parse_label,
)
from cellduality.rewards import RewardContext, build_rewards


def test_well_formed() -> None:
    p = parse_completion("<think>CD14 and LYZ are high</think>\n<answer>CD14+ Monocyte</answer>")
    assert p.well_formed and p.answer == "CD14+ Monocyte" and p.think == "CD14 and LYZ are high"


def test_malformed_shapes() -> None:
    assert not parse_completion("<answer>B cell</answer>").well_formed
    assert parse_completion("<answer>B cell</answer>").answer == "B cell"
    assert parse_completion("no tags at all").answer is None
    assert not parse_completion("<think>x</think><answer></answer>").well_formed
    assert not parse_completion("<think>x</think><answer>a</answer> trailing").well_formed
    assert parse_completion("<think>x<answer>a</answer>").answer == "a"


def test_chat_message_completions() -> None:
    msg = [{"role": "assistant", "content": "<think>t</think><answer>resistant</answer>"}]
    assert parse_label(msg, ["sensitive", "resistant"]) == "resistant"


def test_label_matching_is_exact_up_to_case_and_punctuation() -> None:
    cands = ["CD14+ Monocyte", "CD19+ B"]
    assert parse_label("<think></think><answer> cd14+ monocyte. </answer>", cands) == "CD14+ Monocyte"
    assert parse_label("<think></think><answer>Monocyte</answer>", cands) is None
    assert parse_label("<think></think><answer>CD19+ B or CD14+ Monocyte</answer>", cands) is None


def test_gene_cleaning_contract() -> None:
    vocab = gene_vocabulary(["CD3E", "HLA-DRB1", "MT-CO1", "LYZ"])
    genes = parse_genes("<think>.</think><answer>cd3e, HLA-DRB1 FOO cd3e MT-CO1 lyz</answer>", vocab, 3)
    assert genes == ["CD3E", "HLA-DRB1", "MT-CO1"]
    assert clean_genes(["Actb", "ACTB", "Gapdh"]) == ["Actb", "Gapdh"]
    assert parse_genes("<answer></answer>") == []


ADVERSARIAL = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda a, b, c: f"{a}<think>{b}</think><answer>{c}</answer>",
        st.text(max_size=20),
        st.text(max_size=50),
        st.text(alphabet="ABCD <>/answerthink,\n\t", max_size=60),
    ),
    st.sampled_from(
        [
            "<think><answer></think></answer>",
            "<answer>" * 50,
            "</think></think><answer>A</answer><answer>B</answer>",
            "\x00\ud7ff<think>\u202e</think><answer>\u0000</answer>",
            "<think>" + "x" * 10_000,
        ]
    ),
)
ROW = {
    "task": "annotation",
    "answer": "B",
    "candidates": ["A", "B"],
    "hidden_genes": ["A", "B"],
    "visible_genes": ["C"],
    "n_genes": 2,
}


@settings(max_examples=300, deadline=None)
@given(
    ADVERSARIAL, st.sampled_from(["annotation", "generation", "perturbation", "drug_sensitivity", "other"])
)
def test_fuzz_parser_and_rewards_never_raise(text: str, task: str) -> None:
    parse_completion(text)
    parse_label(text, ["A", "B"])
    parse_genes(text, gene_vocabulary(["A", "B", "C"]), 5)
    row = {**ROW, "task": task, "answer": "A B C" if task in ("generation", "perturbation") else "B"}
    context = RewardContext(
        vocabulary=gene_vocabulary(["A", "B", "C"]), generate=lambda prompts: [text for _ in prompts]
    )
    rewards = build_rewards(["format", "oracle", "oracle_accuracy", "oracle_rwjs", "dual"], context)
    columns = {k: [v] for k, v in row.items()}
    for reward in rewards:
        (value,) = reward(prompts=[[]], completions=[[{"role": "assistant", "content": text}]], **columns)
        assert value is None or (0.0 <= value <= 1.0 and not math.isnan(value))
