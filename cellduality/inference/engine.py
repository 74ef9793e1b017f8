"""One model for prediction: the backends eval uses, batched with a progress bar, plus the dual check.

The backend is chosen as ``cellduality eval`` chooses it (:func:`cellduality.inference.generate.load_backend`:
vLLM when it is installed and a CUDA device is present, Hugging Face otherwise) and is loaded on first
use. Completions go through :func:`cellduality.inference.generate.generate_cached` with an in-memory cache, so
identical greedy prompts (two identical cells) are generated once. Sampled batches get their own seed
each: the Hugging Face backend re-seeds torch per call, and the same prompts in two batches must not
sample the same answer.

:func:`dual_scores` is the label-free confidence: for each forward answer the model answers its dual
(in-painting the hidden genes given the predicted label; naming the condition of the generated cell),
scored by :func:`cellduality.tasks.dual.dual_score`. No ground truth is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from cellduality.inference.cache import entry_key, stable_hash
from cellduality.inference.generate import (
    Backend,
    GenerationSettings,
    ModelSpec,
    backend_name,
    generate_cached,
    load_backend,
)
from cellduality.tasks.dual import dual_prompt, dual_score, forward_answer

Row = dict[str, Any]


class MemoryCache:
    """The part of :class:`cellduality.inference.cache.CompletionCache` generation needs, kept in memory."""

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._entries]

    def put_many(self, items: Any) -> None:
        self._entries.update((str(k), str(c)) for k, c in items)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)


class _SeedPerBatch:
    """A backend whose sampled batches each use ``seed + batch number`` (reproducible, not repeated)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.name = backend.name
        self.chunk_size = backend.chunk_size
        self.calls = 0

    def generate(self, prompts: Sequence[Any], settings: GenerationSettings) -> list[str]:
        self.calls += 1
        if settings.do_sample:
            settings = replace(settings, seed=settings.seed + 7919 * self.calls)
        return self.backend.generate(prompts, settings)


class Engine:
    """One model, loaded lazily; every call is batched under a progress bar."""

    def __init__(
        self,
        model: str,
        settings: GenerationSettings,
        backend: str = "auto",
        factory: Callable[[ModelSpec, GenerationSettings], Backend] | None = None,
        progress: bool = True,
    ) -> None:
        self.spec = ModelSpec(str(model)).resolved()
        self.settings = settings
        self.backend_choice = backend
        self.factory = factory or (lambda s, g: load_backend(s, g, backend))
        self.progress = progress
        self._backend: _SeedPerBatch | None = None
        self.cache = MemoryCache()

    @property
    def backend_name(self) -> str:
        return self._backend.name if self._backend is not None else backend_name(self.backend_choice)

    def _get(self) -> _SeedPerBatch:
        if self._backend is None:
            self._backend = _SeedPerBatch(self.factory(self.spec, self.settings))
        return self._backend

    def complete(
        self, prompts: Sequence[Any], ids: Sequence[str], settings: GenerationSettings, desc: str
    ) -> list[str]:
        """One completion per prompt. Greedy completions of equal prompts are shared; sampled ones are not."""
        if not prompts:
            return []
        if settings.do_sample:
            keys = [entry_key(i, p) for i, p in zip(ids, prompts, strict=True)]
        else:
            keys = [f"greedy#{stable_hash(p)}" for p in prompts]
        return generate_cached(
            prompts, keys, self.cache, settings, self._get, desc=desc, progress=self.progress
        )


def dual_confidence(
    rows: Sequence[Row],
    completions: Sequence[Any],
    answer_duals: Callable[[list[Any], list[int]], list[str]],
    vocabulary: Mapping[str, str],
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per forward completion: its dual score, and whether it gave a usable answer (parsed).

    ``answer_duals(prompts, owners)`` answers the dual prompts (greedy) of the completions at ``owners``;
    each caller brings its own generation and cache (eval's disk cache, predict's memory cache). A
    completion that does not parse scores 0 without a dual prompt, as in the dual reward. The one place
    where the label-free confidence of an answer is computed, for ``eval --self-verify`` and
    ``predict``'s best-of-N alike.
    """
    owners: list[int] = []
    prompts: list[Any] = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        answer = forward_answer(row, completion, vocabulary)
        if answer is not None:
            owners.append(i)
            prompts.append(dual_prompt(row, answer, seed=seed))
    duals = answer_duals(prompts, owners) if prompts else []
    scores = np.zeros(len(rows))
    parsed = np.zeros(len(rows), dtype=bool)
    for i, completion in zip(owners, duals, strict=True):
        scores[i] = dual_score(rows[i], completion, vocabulary)
        parsed[i] = True
    return scores, parsed


def best_by_dual(scores: np.ndarray, parsed: np.ndarray) -> np.ndarray:
    """Per row of (rows x samples): the sample to keep. A usable answer beats an unusable one even when
    both score 0; ties keep the first usable sample (with one sample, that sample)."""
    ranked = np.where(parsed, np.where(np.isnan(scores), 0.0, scores), -1.0)
    return np.argmax(ranked, axis=1) if len(ranked) else np.zeros(0, dtype=int)


def dual_scores(
    rows: Sequence[Row], completions: Sequence[Any], engine: Engine, vocabulary: Mapping[str, str], seed: int
) -> np.ndarray:
    """The dual score of each forward completion, the engine answering the duals greedily."""
    greedy = replace(engine.settings, temperature=0.0)

    def answer(prompts: list[Any], owners: list[int]) -> list[str]:
        return engine.complete(prompts, [rows[i]["id"] for i in owners], greedy, "dual check")

    return dual_confidence(rows, completions, answer, vocabulary, seed)[0]


def best_of(
    rows: Sequence[Row],
    engine: Engine,
    vocabulary: Mapping[str, str],
    *,
    samples: int,
    temperature: float,
    seed: int,
    desc: str,
    confidence: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per row: the chosen completion, its dual score and how many of the samples gave a usable answer.

    ``samples == 1``: one answer (greedy when ``temperature`` is 0). ``samples > 1``: that many sampled
    answers, keeping the one whose dual the model solves best (ties: the first that gave a usable
    answer), the test-time scaling ``cellduality eval --self-verify`` measures.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    settings = replace(engine.settings, temperature=temperature if (samples > 1 or temperature > 0) else 0.0)
    if samples > 1 and settings.temperature <= 0:
        settings = replace(settings, temperature=1.0)
    flat_rows = [r for r in rows for _ in range(samples)]
    ids = [f"{r['id']}#{j}" for r in rows for j in range(samples)]
    completions = engine.complete([r["prompt"] for r in flat_rows], ids, settings, desc)
    usable = np.array(
        [forward_answer(r, c, vocabulary) is not None for r, c in zip(flat_rows, completions, strict=True)]
    ).reshape(len(rows), samples)
    if confidence or samples > 1:
        scores = dual_scores(flat_rows, completions, engine, vocabulary, seed).reshape(len(rows), samples)
    else:
        scores = np.full((len(rows), samples), np.nan)
    best = best_by_dual(scores, usable)
    chosen = [completions[i * samples + int(j)] for i, j in enumerate(best)]
    chosen_scores = scores[np.arange(len(rows)), best] if len(rows) else np.zeros(0)
    return chosen, chosen_scores, usable.sum(axis=1)


__all__ = ["Engine", "MemoryCache", "best_by_dual", "best_of", "dual_confidence", "dual_scores"]
