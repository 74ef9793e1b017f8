"""The complementary dual of every task: the prompt it asks and how its answer is scored.

Forward classification (cell -> label) is checked by in-painting: given the visible genes and the
*predicted* label, the policy must name the hidden genes; a right label should make that easier, so
RWJS(hidden, in-painted) rewards it. Forward generation (condition -> cell) is checked by
reconstruction: the policy must name the condition of the *generated* cell among candidates; reward 1
when it names the prompted condition. No ground-truth answer is read here.

Tasks outside the 2x2 suite (knowledge-graph neighbourhood editing) have no dual: ``has_dual`` is
False for them, ``forward_answer`` returns ``None`` (so the dual reward scores them ``None`` and the
SFT generator makes no dual example), ``dual_prompt`` returns ``None`` and ``dual_score`` 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cellduality.data.schema import TASKS
from cellduality.parsing import clean_genes, match_label, parse_completion, parse_genes, parse_label
from cellduality.rwjs import rwjs
from cellduality.tasks.common import example_rng, join_candidates, join_genes, messages, pick
from cellduality.tasks.templates import INPAINT, RECONSTRUCT_PERTURBATION, RECONSTRUCT_TYPE

CLASSIFICATION_TASKS = ("annotation", "drug_sensitivity")
GENERATION_TASKS = ("generation", "perturbation")
DUAL_TASKS = (*CLASSIFICATION_TASKS, *GENERATION_TASKS)


def has_dual(task: Any) -> bool:
    """Whether ``task`` has a complementary dual task (the 2x2 suite does; neighbourhood editing not)."""
    return task in DUAL_TASKS


def forward_answer(
    row: Mapping[str, Any], completion: Any, vocabulary: Mapping[str, str] | None = None
) -> str | None:
    """The usable answer of a forward completion: a candidate label, or a cleaned gene sentence.

    ``None`` when the completion has no answer the dual task could start from.
    """
    task = row.get("task")
    if task in CLASSIFICATION_TASKS:
        return parse_label(completion, row.get("candidates") or [])
    if task in GENERATION_TASKS:
        genes = parse_genes(completion, vocabulary, int(row.get("n_genes") or 0) or None)
        return join_genes(genes) if genes else None
    return None


def control_cell_genes(row: Mapping[str, Any]) -> list[str]:
    """The paired control cell of a perturbation row, cut to the genes its answer names (``n_genes``).

    As a forward answer it is the "nothing changed" guess: the dual check, the counterfactual SFT
    examples and the data bound all compare against exactly this cell, so they share one definition.
    """
    n = int(row.get("n_genes") or 0) or None
    return list(row.get("cell_genes") or [])[:n]


def label_words(row: Mapping[str, Any], label: str) -> str:
    if row.get("task") == "drug_sensitivity":
        return f"{row.get('condition_text') or row.get('condition')}-{label}"
    return label


def dual_prompt(row: Mapping[str, Any], answer: str, seed: int = 0) -> list[dict[str, str]] | None:
    """Chat messages of the dual task for a forward example and its (parsed) forward answer.

    ``None`` for a task without a dual (see :func:`has_dual`); an unknown task is an error.
    """
    task = row.get("task")
    if task in TASKS and not has_dual(task):
        return None
    rng = example_rng(seed, f"dual/{row.get('id', '')}")
    if task in CLASSIFICATION_TASKS:
        hidden = row.get("hidden_genes") or []
        text = pick(rng, INPAINT).format(
            label=label_words(row, answer), cell=join_genes(row.get("visible_genes") or []), n=len(hidden)
        )
        return messages(text)
    if task == "generation":
        text = pick(rng, RECONSTRUCT_TYPE).format(cell=answer, candidates=join_candidates(row["candidates"]))
        return messages(text)
    if task == "perturbation":
        context = row.get("context") or ""
        text = pick(rng, RECONSTRUCT_PERTURBATION).format(
            control=join_genes(row.get("cell_genes") or []),
            cell=answer,
            candidates=join_candidates(row["candidates"]),
            context=f" ({context})" if context else "",
        )
        return messages(text)
    raise ValueError(f"no dual task for task {task!r}")


def dual_score(
    row: Mapping[str, Any], dual_completion: Any, vocabulary: Mapping[str, str] | None = None
) -> float:
    """Reward of a dual completion in [0, 1]; malformed completions score 0."""
    task = row.get("task")
    if task in CLASSIFICATION_TASKS:
        hidden = list(row.get("hidden_genes") or [])
        generated = parse_genes(dual_completion, vocabulary, len(hidden) or None)
        return rwjs_casefold(hidden, generated)
    if task in GENERATION_TASKS:
        named = parse_label(dual_completion, row.get("candidates") or [])
        return 1.0 if named is not None and match_label(named, [row.get("condition", "")]) else 0.0
    return 0.0


def rwjs_casefold(reference: Sequence[str], generated: Sequence[str]) -> float:
    """RWJS with gene symbols compared case-insensitively (the contract's matching rule)."""
    return rwjs([g.casefold() for g in reference], [g.casefold() for g in generated])


def answer_text(completion: Any) -> str | None:
    """The raw answer text of a completion (for logging), ``None`` when it has none."""
    return parse_completion(completion).answer


__all__ = [
    "CLASSIFICATION_TASKS",
    "DUAL_TASKS",
    "GENERATION_TASKS",
    "answer_text",
    "clean_genes",
    "dual_prompt",
    "dual_score",
    "forward_answer",
    "has_dual",
    "rwjs_casefold",
]
