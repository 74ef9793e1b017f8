"""Completion parsing: ``<think>...</think><answer>...</answer>`` -> answer text, label or gene list.

Everything here is total: any string (or chat message list) goes in, nothing raises. Malformed output
parses to ``None`` / an empty list, which the rewards turn into their lowest value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_STRICT = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_GENE_SPLIT = re.compile(r"[\s,;]+")
_LABEL_STRIP = " \t\r\n.,;:!?\"'`*[](){}"


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says: the reasoning, the answer and whether the format was exactly right."""

    think: str | None
    answer: str | None
    well_formed: bool


def completion_text(completion: Any) -> str:
    """Text of a completion as TRL hands it over: a string or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
        return content if isinstance(content, str) else ""
    if isinstance(completion, Sequence):
        parts = [completion_text(m) for m in completion if isinstance(m, Mapping)]
        return "".join(parts)
    return ""


def parse_completion(completion: Any) -> ParsedCompletion:
    """Split a completion into reasoning and answer; ``well_formed`` only for the exact contract shape."""
    text = completion_text(completion)
    strict = _STRICT.match(text)
    if strict:
        think, answer = strict.group(1).strip(), strict.group(2).strip()
        return ParsedCompletion(
            think=think, answer=answer or None, well_formed=bool(answer) and "<" not in answer
        )
    answers = _ANSWER.findall(text)
    thinks = _THINK.findall(text)
    answer = answers[-1].strip() if answers else None
    return ParsedCompletion(
        think=thinks[0].strip() if thinks else None, answer=answer or None, well_formed=False
    )


def normalize_label(label: str) -> str:
    """Case- and punctuation-insensitive form of a label, used to compare answers with candidates."""
    return " ".join(label.strip(_LABEL_STRIP).casefold().split())


def match_label(answer: str | None, candidates: Iterable[str]) -> str | None:
    """The candidate the answer names exactly (ignoring case, spacing and surrounding punctuation)."""
    if not answer:
        return None
    wanted = normalize_label(answer)
    for candidate in candidates:
        if normalize_label(str(candidate)) == wanted:
            return str(candidate)
    return None


def parse_label(completion: Any, candidates: Iterable[str]) -> str | None:
    """The candidate label a completion answers with, or ``None`` when it names none of them."""
    return match_label(parse_completion(completion).answer, candidates)


def clean_genes(
    tokens: Iterable[str],
    vocabulary: Mapping[str, str] | None = None,
    max_genes: int | None = None,
) -> list[str]:
    """Contract cleaning of a generated gene list: case-fold, drop unknown, de-duplicate, truncate.

    ``vocabulary`` maps case-folded symbols to their canonical spelling; without it every token is kept
    as written (duplicates are still found case-insensitively).
    """
    seen: set[str] = set()
    genes: list[str] = []
    for token in tokens:
        word = str(token).strip(_LABEL_STRIP)
        key = word.casefold()
        if not key or key in seen:
            continue
        if vocabulary is not None:
            gene = vocabulary.get(key)
            if gene is None:
                continue
        else:
            gene = word
        seen.add(key)
        genes.append(gene)
        if max_genes is not None and len(genes) >= max_genes:
            break
    return genes


def parse_genes(
    completion: Any,
    vocabulary: Mapping[str, str] | None = None,
    max_genes: int | None = None,
) -> list[str]:
    """Cleaned gene list of a generation answer; empty when there is no answer."""
    answer = parse_completion(completion).answer
    if not answer:
        return []
    return clean_genes(_GENE_SPLIT.split(answer), vocabulary, max_genes)


def gene_vocabulary(genes: Iterable[str]) -> dict[str, str]:
    """Case-folded symbol -> canonical symbol, the lookup ``clean_genes`` expects."""
    vocab: dict[str, str] = {}
    for gene in genes:
        vocab.setdefault(str(gene).casefold(), str(gene))
    return vocab
