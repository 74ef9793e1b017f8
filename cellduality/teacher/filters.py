"""Quality filters for teacher traces: which completions become SFT examples, and why the others do not.

SFT imitates whatever it is shown, so a trace is kept only when its answer is checkably good:

- every trace must be in the completion format exactly (``<think>`` with some reasoning, then
  ``<answer>``, nothing around them): a student trained on sloppy tags gets the format reward's minimum;
- a label (forward classification, and the reconstruction dual of the generation tasks) must name the
  ground-truth label among the prompt's candidates: rejection sampling, the filter of STaR-style
  distillation, because a right answer reached by wrong reasoning is rare while a wrong answer teaches
  the wrong thing for sure;
- a gene list (forward generation, and the in-painting dual of the classification tasks) must reach
  ``RWJS >= threshold`` against the reference genes after the contract's cleaning: exact agreement is
  hopeless for a list of a hundred genes, so the bar is "recognisably this cell" (see
  ``sft_data/README.md`` for how the default threshold was chosen);
- a neighbourhood edit (forward only: the task has no dual) must be well formed, non-empty and valid
  (additions among the candidates, removals among the neighbours).

Scores are those of the rewards and the dual task (``cellduality.tasks.dual.dual_score``), so what the
filter keeps is what GRPO and evaluation would score as good. Nothing here raises on bad input: a
malformed trace is a rejection with a reason.

A kept trace is stored in canonical form: the teacher's reasoning unchanged, the answer rewritten as the
exact candidate label or the cleaned gene list, so the SFT target is exactly what was scored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellduality.parsing import match_label, parse_completion, parse_genes, parse_label
from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS, dual_score, rwjs_casefold
from cellduality.teacher.prompts import DUAL, FORWARD

#: The default bar for gene lists; see sft_data/README.md ("Choosing --rwjs-threshold").
DEFAULT_RWJS_THRESHOLD = 0.3

#: Gene-list scores are rounded to this many decimals (see ``_judge_genes``).
SCORE_DECIMALS = 9

# Rejection reasons (stable strings: they are written to attempts.jsonl and summary.json).
MALFORMED = "malformed"  # not exactly <think>...</think><answer>...</answer>
NO_REASONING = "no_reasoning"  # the format is right but <think> is empty
NOT_A_CANDIDATE = "not_a_candidate"  # a label answer that names none of the prompt's candidates
WRONG_LABEL = "wrong_label"  # names a candidate, not the right one
NO_GENES = "no_genes"  # a gene answer with no known gene symbol left after cleaning
LOW_RWJS = "low_rwjs"  # genes recognisably not the reference cell: RWJS below the threshold
EMPTY_EDIT = "empty_edit"  # a neighbourhood edit that adds and removes nothing
INVALID_EDIT = "invalid_edit"  # adds a non-candidate or removes a non-neighbour

REASONS = (
    MALFORMED,
    NO_REASONING,
    NOT_A_CANDIDATE,
    WRONG_LABEL,
    NO_GENES,
    LOW_RWJS,
    EMPTY_EDIT,
    INVALID_EDIT,
)


@dataclass(frozen=True)
class Verdict:
    """What the filter decided about one trace.

    ``score`` is the task score (1/0 for labels, RWJS for genes; ``None`` when the trace did not parse),
    ``answer`` the canonical answer and ``completion`` the canonical completion (both ``None`` when the
    trace did not parse).
    """

    kept: bool
    reason: str | None = None
    score: float | None = None
    answer: str | None = None
    completion: str | None = None


def canonical_completion(think: str, answer: str) -> str:
    """The completion format with the reasoning as given and the answer in canonical form."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def answers_with_label(task: str, kind: str) -> bool:
    """True when the (task, kind) question is answered with one candidate label, False for genes."""
    if task in CLASSIFICATION_TASKS:
        return kind == FORWARD
    if task in GENERATION_TASKS:
        return kind == DUAL
    raise ValueError(f"unknown task {task!r}")


def judge(
    row: Mapping[str, Any],
    kind: str,
    text: str | None,
    *,
    vocabulary: Mapping[str, str] | None = None,
    rwjs_threshold: float = DEFAULT_RWJS_THRESHOLD,
) -> Verdict:
    """Keep or reject the teacher's ``text`` for the forward or dual question of example ``row``.

    ``vocabulary`` (case-folded symbol -> symbol, from ``gene_vocabulary``) drops unknown genes as the
    rewards do; ``None`` keeps every token.
    """
    if kind not in (FORWARD, DUAL):
        raise ValueError(f"kind must be {FORWARD!r} or {DUAL!r}, got {kind!r}")
    parsed = parse_completion(text or "")
    if not parsed.well_formed or parsed.answer is None:
        return Verdict(False, MALFORMED)
    think = parsed.think or ""
    if not think.strip():
        return Verdict(False, NO_REASONING)
    task = str(row.get("task"))
    if task == "neighbourhood":
        return _judge_edit(row, kind, text or "", think)
    if answers_with_label(task, kind):
        return _judge_label(row, kind, text or "", think)
    return _judge_genes(row, kind, text or "", think, vocabulary, rwjs_threshold)


def _judge_label(row: Mapping[str, Any], kind: str, text: str, think: str) -> Verdict:
    label = parse_label(text, row.get("candidates") or [])
    if label is None:
        return Verdict(False, NOT_A_CANDIDATE, score=0.0)
    if kind == FORWARD:
        right = match_label(label, [str(row.get("answer", ""))]) is not None
        score = 1.0 if right else 0.0
    else:
        score = dual_score(row, text)
    completion = canonical_completion(think, label)
    if score < 1.0:
        return Verdict(False, WRONG_LABEL, score=score, answer=label, completion=completion)
    return Verdict(True, score=score, answer=label, completion=completion)


def _judge_genes(
    row: Mapping[str, Any],
    kind: str,
    text: str,
    think: str,
    vocabulary: Mapping[str, str] | None,
    threshold: float,
) -> Verdict:
    if kind == FORWARD:
        reference = str(row.get("answer", "")).split()
        n = int(row.get("n_genes") or 0) or len(reference) or None
    else:
        reference = list(row.get("hidden_genes") or [])
        n = len(reference) or None
    genes = parse_genes(text, vocabulary, n)
    if not genes:
        return Verdict(False, NO_GENES, score=0.0)
    score = rwjs_casefold(reference, genes) if kind == FORWARD else dual_score(row, text, vocabulary)
    # RWJS sums over a set of genes, whose order (string hashing) differs between processes, so the
    # last bit of the float can too: rounded, a resumed run in a new process decides exactly alike.
    score = round(score, SCORE_DECIMALS)
    answer = " ".join(genes)
    completion = canonical_completion(think, answer)
    if score < threshold:
        return Verdict(False, LOW_RWJS, score=score, answer=answer, completion=completion)
    return Verdict(True, score=score, answer=answer, completion=completion)


def _judge_edit(row: Mapping[str, Any], kind: str, text: str, think: str) -> Verdict:
    """A neighbourhood edit is kept when it is well formed, non-empty and every item is valid.

    Whether it improves the prediction needs the training deltas, which the rewards (not the filter)
    read; the filter keeps what the format and validity rewards would score at their best.
    """
    from cellduality.rewards.neighbourhood import validity_score
    from cellduality.tasks.neighbourhood import format_edit, parse_edit, resolve_edit

    if kind != FORWARD:
        return Verdict(False, MALFORMED)  # the task has no dual question
    edit = parse_edit(text)
    if edit is None or not edit.well_formed:
        return Verdict(False, MALFORMED)
    score = validity_score(row, text)
    if edit.empty:
        return Verdict(False, EMPTY_EDIT, score=score)
    resolved = resolve_edit(edit, row.get("neighbours") or [], row.get("candidates") or [])
    answer = format_edit(resolved.added, resolved.removed)
    completion = canonical_completion(think, answer)
    if resolved.invalid:
        return Verdict(False, INVALID_EDIT, score=score, answer=answer, completion=completion)
    return Verdict(True, score=score, answer=answer, completion=completion)


__all__ = [
    "DEFAULT_RWJS_THRESHOLD",
    "EMPTY_EDIT",
    "INVALID_EDIT",
    "LOW_RWJS",
    "MALFORMED",
    "NOT_A_CANDIDATE",
    "NO_GENES",
    "NO_REASONING",
    "REASONS",
    "WRONG_LABEL",
    "Verdict",
    "answers_with_label",
    "canonical_completion",
    "judge",
]
